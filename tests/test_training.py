"""Muon, gradients, schedule, EMA, compile warm-up restore and the wallclock guard."""

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import train_gpt as tg
from conftest import ROOT, tiny_hyperparameters
from distributed import run_distributed


def test_newton_schulz_output_is_near_orthogonal():
    for shape in [(64, 64), (32, 128), (128, 32)]:
        G = torch.randn(3, *shape)
        X = tg.newton_schulz_orthogonalize(G, steps=5).double()
        s = torch.linalg.svdvals(X)
        _assert_near_orthogonal(s)
        # and keeps the singular vectors: X ~ U V^T of G
        U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
        assert torch.nn.functional.cosine_similarity((U @ Vh).flatten(1), X.flatten(1)).min() > 0.97


def test_polar_express_maps_singular_values_closer_to_one():
    torch.manual_seed(0)
    for shape in [(64, 64), (32, 128), (256, 64)]:
        G = torch.randn(3, *shape)
        polar = torch.linalg.svdvals(tg.newton_schulz_orthogonalize(G, 5, "polar_express").double())
        quintic = torch.linalg.svdvals(tg.newton_schulz_orthogonalize(G, 5, "quintic").double())
        assert 0.84 < torch.quantile(polar.flatten(), 0.05) and polar.max() < 1.16  # all but the tiniest
        assert torch.quantile(quintic.flatten(), 0.05) < 0.77  # where the fixed quintic leaves them
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    X = tg.newton_schulz_orthogonalize(G, 5, "polar_express").double()
    assert torch.nn.functional.cosine_similarity((U @ Vh).flatten(1), X.flatten(1)).min() > 0.99


POLAR_EXPRESS = [  # the published per-step coefficients (Amsel et al. 2025), written out independently
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


@pytest.mark.parametrize("name, steps", [("quintic", [(3.4445, -4.7750, 2.0315)] * 5), ("polar_express", POLAR_EXPRESS)])
def test_newton_schulz_applies_each_steps_polynomial_to_the_singular_values(name, steps):
    """On a diagonal matrix the iteration acts on each singular value alone: x <- a x + (b x^2 +
    c x^4) x with step i's (a, b, c), starting from s / ||s||_F; the reference rounds to bf16
    where the matrix products do."""
    s = torch.tensor([1.0, 0.5, 0.1, 0.02])
    bf16 = lambda t: t.bfloat16()
    x = bf16(s)
    x = x / (x.norm() + 1e-7)
    for a, b, c in steps:
        A = bf16(x * x)
        x = a * x + bf16((b * A + c * bf16(A * A)) * x)
    out = tg.newton_schulz_orthogonalize(torch.diag(s)[None], 5, name)[0].diagonal()
    assert torch.allclose(out.float(), x.float(), atol=1e-2), (out, x)


def test_muon_coefficient_choices_are_the_table():
    assert tg.Hyperparameters.__dataclass_fields__["muon_ns_coefficients"].metadata["choices"] == tuple(tg.NEWTON_SCHULZ_COEFFICIENTS)


def _assert_near_orthogonal(s):
    """The quintic iteration maps singular values into about [0.7, 1.2]; only the few tiny
    ones of the input (a random square matrix has some) stay below."""
    assert s.max() < 1.25
    assert torch.quantile(s.flatten(), 0.05) > 0.6


def _muon_setup(world_size=1, rank=0, seed=0):
    torch.manual_seed(seed)
    fused = nn.Parameter(torch.randn(96, 32))  # three 32x32 matrices stacked, like qkv
    wide = nn.Parameter(torch.randn(32, 64))
    tall = nn.Parameter(torch.randn(64, 32))
    matrices = [(fused, slice(0, 32)), (fused, slice(32, 64)), (fused, slice(64, 96)), (wide, slice(None)), (tall, slice(None))]
    for p in (fused, wide, tall):
        p.grad = torch.randn_like(p)
    muon = tg.Muon(matrices, lr=0.1, weight_decay=0.0, ns_steps=5, rank=rank, world_size=world_size)
    muon.momentum = 0.9
    return muon, (fused, wide, tall), matrices


def test_muon_update_is_row_normalised_orthogonal_and_scaled():
    muon, params, matrices = _muon_setup()
    before = [p.detach().clone() for p in params]
    grads = [p.grad.clone() for p in params]
    muon.step(lr_mult=1.0)
    owners = [0, 0, 0, 1, 2]  # fused qkv is three matrices
    for (p, rows), i in zip(matrices, owners):
        update = (before[i][rows] - p.detach()[rows]) / 0.1
        r, c = update.shape
        s = torch.linalg.svdvals(update.double()) / math.sqrt(max(1.0, r / c))
        _assert_near_orthogonal(s)
        # reference: first step, momentum buffer = g, Nesterov u = g + 0.9 g; unit rows; NS; scale
        u = 1.9 * grads[i][rows]
        u = u / u.norm(dim=-1, keepdim=True)
        expected = tg.newton_schulz_orthogonalize(u[None], 5)[0].float() * math.sqrt(max(1.0, r / c))
        assert torch.allclose(update, expected, atol=2e-2), (rows, (update - expected).abs().max())


def test_muon_decoupled_weight_decay():
    muon, params, _ = _muon_setup()
    for p in params:
        p.grad.zero_()
    muon.weight_decay = 0.5
    before = [p.detach().clone() for p in params]
    muon.step(lr_mult=0.5)  # zero gradient: the update is pure decay by lr * wd
    for p, b in zip(params, before):
        assert torch.allclose(p.detach(), b * (1 - 0.1 * 0.5 * 0.5))


def _muon_on_rank(rank, world_size):
    muon, params, _ = _muon_setup(world_size, rank)
    for _ in range(3):
        muon.step(lr_mult=1.0)
    return [p.detach().clone() for p in params]


def test_sharded_muon_matches_single_rank():
    single = _muon_on_rank(0, 1)
    for result in run_distributed(_muon_on_rank, 2):
        for a, b in zip(result, single):
            assert torch.allclose(a, b, atol=1e-6)


def test_grad_buffer_views_clip_and_zero():
    model = nn.Linear(4, 3)
    buf = tg.GradBuffer(list(model.parameters()))
    model(torch.randn(5, 4)).pow(2).sum().backward()
    model(torch.randn(5, 4)).pow(2).sum().backward()  # accumulates in place
    assert model.weight.grad.data_ptr() == buf.flat.data_ptr()
    norm = buf.clip_(0.5)
    assert norm > 0.5 and abs(buf.flat.norm().item() - 0.5) < 1e-5
    buf.zero_()
    assert model.weight.grad.abs().sum() == 0 and model.bias.grad.abs().sum() == 0


def test_parameter_split_covers_everything_once():
    model = tg.GPT(tiny_hyperparameters().model_config())
    matrices, embed, scalars = tg.split_parameters(model)
    matrix_params = {id(p) for p, _ in matrices}
    ids = [id(p) for p in embed + scalars] + list(matrix_params)
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert len(matrices) == 6 * 4 and all(p.ndim == 2 for p, _ in matrices)
    assert embed == [model.tok_emb.weight]


def test_lr_schedule_flat_then_linear_warmdown():
    assert tg.lr_multiplier(0.0, 0.72, 0.0) == 1.0
    assert tg.lr_multiplier(0.28, 0.72, 0.0) == pytest.approx(1.0)
    assert tg.lr_multiplier(0.64, 0.72, 0.0) == pytest.approx(0.5)
    assert tg.lr_multiplier(1.0, 0.72, 0.0) == 0.0
    assert tg.lr_multiplier(1.0, 0.72, 0.1) == pytest.approx(0.1)
    assert tg.lr_multiplier(0.64, 0.72, 0.1) == pytest.approx(0.5)  # a floor, not a rescaled ramp
    assert tg.lr_multiplier(0.95, 0.72, 0.1) == pytest.approx(0.1)
    assert tg.lr_multiplier(0.5, 0.0, 0.0) == 1.0


def test_training_progress_follows_steps_or_clock_whichever_is_further():
    assert tg.training_progress(50, 10.0, 100.0, 200) == 0.25  # step-driven (B4)
    assert tg.training_progress(50, 60.0, 100.0, 20000) == 0.6  # clock-driven (a timed run)
    assert tg.training_progress(300, 10.0, 100.0, 200) == 1.0


def test_fixed_step_run_switches_recurrence_and_warms_down_by_steps(tmp_path, tiny_data):
    """ITERATIONS=20 with a budget far away: recurrence from step 7 (35%), LR multiplier
    (1 - step/20)/0.72 in warmdown down to the 0.10 floor, as the steps say, whatever the clock."""
    h, rt, model, opt, make_loader = _tiny_training(tmp_path, tiny_data, iterations=20, max_wallclock_seconds=1e6, grad_accum_steps=1, log_every=1, muon_wd_final=0.5, warmdown_frac=0.72)
    lines, multipliers, wd = [], [], []
    step = opt.step
    opt.step = lambda lr_mult, momentum, clip, wd_mult: (multipliers.append(lr_mult), wd.append(wd_mult), step(lr_mult, momentum, clip, wd_mult))[2]
    result = tg.train(model, opt, tg.WeightEMA(list(model.parameters()), h.ema_decay, h.ema_power), make_loader(), h, rt, lines.append)
    assert result.steps == 20 and result.stop_reason == "reached ITERATIONS=20"
    assert any(l.startswith("step 7: depth recurrence on") for l in lines)
    assert multipliers[:6] == [1.0] * 6 and multipliers[15] == pytest.approx(0.25 / 0.72) and multipliers[19] == pytest.approx(0.10)
    assert wd[:15] == [1.0] * 15 and wd[19] == pytest.approx(1 - 0.5 * (0.95 - 0.7) / 0.3)  # the taper, by steps too


def test_muon_momentum_warmup():
    h = tg.Hyperparameters()
    assert tg.muon_momentum_at(0, h) == pytest.approx(0.92)
    assert tg.muon_momentum_at(750, h) == pytest.approx(0.945)
    assert tg.muon_momentum_at(5000, h) == pytest.approx(0.97)


def test_ema_is_the_power_weighted_average_of_iterates():
    p = nn.Parameter(torch.zeros(3))
    ema = tg.WeightEMA([p], decay=0.9999, power=2.0)
    ema.steps = 0
    iterates = []
    for t in range(1, 41):
        p.data.fill_(float(t))  # iterate t
        iterates.append(float(t))
        ema.update()
    weights = torch.tensor([s**2 for s in range(1, 41)], dtype=torch.float64)
    expected = (weights * torch.tensor(iterates, dtype=torch.float64)).sum() / weights.sum()
    # (1 - 1/t)^(power+1) is the discrete power-function EMA: close to the exact weighted mean
    assert abs(ema.shadow[0][0].item() - expected.item()) < 0.02 * expected.item()


def test_ema_of_a_short_run_forgets_the_initialisation():
    p = nn.Parameter(torch.full((4,), 100.0))  # a bad initialisation
    ema = tg.WeightEMA([p], decay=0.9965, power=15.0)
    for _ in range(180):
        p.data.fill_(1.0)  # training moved away at once
        ema.update()
    raw = ema.swap_in()
    assert torch.allclose(p.detach(), torch.ones(4), atol=1e-6)  # a fixed 0.9965 EMA would hold ~53
    assert torch.equal(raw[0], torch.ones(4))


def test_ema_decay_is_capped():
    p = nn.Parameter(torch.zeros(1))
    ema = tg.WeightEMA([p], decay=0.5, power=15.0)
    for _ in range(100):
        ema.update()
    p.data.fill_(1.0)
    ema.update()
    assert ema.shadow[0].item() == pytest.approx(0.5)


def test_stop_reason():
    assert tg.stop_reason(10, 50.0, 1.0, 100.0, 1000) is None
    assert "ITERATIONS=10" in tg.stop_reason(10, 50.0, 1.0, 100.0, 10)
    assert tg.stop_reason(5, 98.0, 1.0, 100.0, 1000) is None
    assert tg.stop_reason(5, 99.0, 1.0, 100.0, 1000).startswith("wallclock")  # 99 + 1.05 > 100


def _tiny_training(tmp_path, tiny_data, **overrides):
    root, _ = tiny_data
    h = tiny_hyperparameters(data_dir=str(root), **overrides)
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"))
    h.validate(1)
    files = tg.find_shards(h, "train")
    seqs = h.train_batch_tokens // (h.accum_steps(1) * h.train_seq_len)
    make_loader = lambda: tg.TrainLoader(files, h.train_seq_len, seqs, 0, 1, h.seed, h.vocab_size, rt.device)
    model = tg.GPT(h.model_config())
    return h, rt, model, tg.Optimizers(model, h, rt), make_loader


class StepClock:
    """A clock that advances by the next of `step_seconds` (the last one repeats) at every
    reading after the first: train() reads it once at the start and once per step."""

    def __init__(self, step_seconds):
        self.step_seconds, self.readings, self.now = list(step_seconds), 0, 0.0

    def __call__(self):
        if self.readings:
            self.now += self.step_seconds[min(self.readings - 1, len(self.step_seconds) - 1)]
        self.readings += 1
        return self.now


@pytest.mark.parametrize("step_seconds, steps", [([0.25], 9), ([0.25] * 7 + [0.5], 8)])
def test_wallclock_guard_stops_inside_the_budget(tmp_path, tiny_data, step_seconds, steps):
    """Budget 2.5 s: with 0.25 s steps the guard stops after step 9 (2.25 + 1.05 x 0.25 > 2.5);
    when step 8 takes 0.5 s, it stops after step 8 (2.25 + 1.05 x 0.5 > 2.5)."""
    h, rt, model, opt, make_loader = _tiny_training(tmp_path, tiny_data, max_wallclock_seconds=3.0, gptq_reserve_seconds=0.5, grad_accum_steps=1)
    lines = []
    result = tg.train(model, opt, tg.WeightEMA(list(model.parameters()), h.ema_decay, h.ema_power), make_loader(), h, rt, lines.append, clock=StepClock(step_seconds))
    assert result.steps == steps and result.stop_reason.startswith("wallclock")
    assert result.seconds <= 2.5  # MAX_WALLCLOCK_SECONDS - GPTQ_RESERVE_SECONDS
    assert set(result.tokens_per_second) == {"before_looping", "looping"}  # steps ran in both phases
    assert any("stopped after" in l and "wallclock" in l for l in lines)
    assert any(l.startswith("step 4: depth recurrence on at 1.0s") for l in lines)  # first step at >= 35% of 2.5 s
    assert result.looping and not model.looping  # the trained model loops; the model's own default stays as built


def _train_two_ranks(rank, world_size, data_root, step_seconds):
    """Real training on each rank from the same initialisation, rank 1's clock running slower."""
    h = tiny_hyperparameters(data_dir=str(data_root), max_wallclock_seconds=3.0, gptq_reserve_seconds=0.5, grad_accum_steps=1)
    rt = tg.Runtime(rank, world_size, 0, torch.device("cpu"))
    torch.manual_seed(0)
    model = tg.GPT(h.model_config())
    opt = tg.Optimizers(model, h, rt)
    seqs = h.train_batch_tokens // (world_size * h.train_seq_len)
    loader = tg.TrainLoader(tg.find_shards(h, "train"), h.train_seq_len, seqs, rank, world_size, h.seed, h.vocab_size, rt.device)
    ema = tg.WeightEMA(list(model.parameters()), h.ema_decay, h.ema_power)
    result = tg.train(model, opt, ema, loader, h, rt, lambda msg: None, clock=StepClock([step_seconds[rank]]))
    return result.steps, result.seconds, {k: v.clone() for k, v in model.state_dict().items()}


def test_two_ranks_stop_on_the_same_step_with_identical_weights(tiny_data):
    root, _ = tiny_data
    (steps0, seconds0, state0), (steps1, seconds1, state1) = run_distributed(_train_two_ranks, 2, root, [0.25, 0.6])
    assert steps0 == steps1 == 9 and seconds0 == seconds1 == 2.25  # rank 0's clock decides for both
    for k in state0:
        assert torch.equal(state0[k], state1[k]), k


class FixedBatches:
    def __init__(self, seqs):
        self.seqs = seqs

    def next_batch(self):
        return self.seqs[:, :-1], self.seqs[:, 1:]

    def prefetch(self):
        pass


def _one_step(rank, world_size, seqs):
    """One train_step on this rank's share of seqs; returns the averaged gradient it used and
    the weights after the step (fp64, so the split changes nothing but summation order)."""
    h = tiny_hyperparameters(grad_clip_norm=0.0)
    rt = tg.Runtime(rank, world_size, 0, torch.device("cpu"))
    torch.manual_seed(0)
    model = tg.GPT(h.model_config()).double()
    opt = tg.Optimizers(model, h, rt)
    gradients = []
    clip = opt.grads.clip_
    opt.grads.clip_ = lambda max_norm: (gradients.append(opt.grads.flat.clone()), clip(max_norm))[1]
    share = len(seqs) // world_size
    tg.train_step(model, opt, FixedBatches(seqs[rank * share : (rank + 1) * share]), h, rt, 1, tg.StepSettings(1.0, 0.9, 1.0, False, h.train_seq_len))
    return gradients[0], {k: v.clone() for k, v in model.state_dict().items()}


def test_two_rank_gradients_equal_the_one_rank_gradient_of_the_union_batch():
    seqs = torch.randint(0, tiny_hyperparameters().vocab_size, (8, 33))
    grad, state = _one_step(0, 1, seqs)
    for rank_grad, rank_state in run_distributed(_one_step, 2, seqs):
        assert torch.allclose(rank_grad, grad, rtol=1e-10, atol=1e-12)
        for k in state:
            assert torch.allclose(rank_state[k], state[k], atol=1e-6), k


def test_warm_up_restores_model_and_optimizer_state(tmp_path, tiny_data):
    h, rt, model, opt, make_loader = _tiny_training(tmp_path, tiny_data, warmup_steps=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tg.warm_up(model, opt, h, rt, make_loader, lambda msg: None)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not opt.adam.state and all(b["momentum"].abs().sum() == 0 for b in opt.muon.banks)
    # a step after warm-up is the same as a step without warm-up
    _, _, fresh, fresh_opt, _ = _tiny_training(tmp_path, tiny_data)
    fresh.load_state_dict(before)
    for m, o in ((model, opt), (fresh, fresh_opt)):
        tg.train_step(m, o, make_loader(), h, rt, h.accum_steps(1), tg.StepSettings(1.0, 0.95, 1.0, False, h.train_seq_len))
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k



# torch.compile on the CPU (Inductor): the compiled training forward gives the eager loss.
# Inductor's first compilation in a process costs ~20 s on a CPU, so the check runs in a
# subprocess that conftest starts as soon as this test is selected, beside the other tests. The
# backward is traced with the forward (fullgraph) but compiled only at the first backward call,
# which this check leaves out to keep the suite short; the GPU tests run compiled training steps.
COMPILE_CHECK = textwrap.dedent(
    """
    import json, torch, train_gpt as tg
    from conftest import tiny_hyperparameters
    torch.manual_seed(0)
    h = tiny_hyperparameters(num_layers=1, parallel_from_layer=1, loop_start=0, loop_end=0, num_loops=0)
    model = tg.GPT(h.model_config())
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    ids, targets = torch.randint(0, h.vocab_size, (2, 32)), torch.randint(0, h.vocab_size, (2, 32))
    eager = model(ids, targets).item()
    tg.compile_model(model)
    compiled = model(ids, targets).item()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # Dynamo really compiled
    print(json.dumps(dict(eager=eager, compiled=compiled, graphs=graphs)))
    """
)
_compile_check: dict = {}


def start_compile_check():
    if "proc" not in _compile_check:
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
        _compile_check["proc"] = subprocess.Popen([sys.executable, "-c", COMPILE_CHECK], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_compiled_model_matches_eager():
    start_compile_check()
    out, err = _compile_check["proc"].communicate(timeout=600)
    assert _compile_check["proc"].returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["graphs"] >= 3  # SmearGate, the block, the loss head
    assert result["compiled"] == pytest.approx(result["eager"], abs=1e-5)


test_compiled_model_matches_eager.start_early = start_compile_check


def test_muon_weight_decay_taper():
    assert [tg.muon_wd_multiplier(f, 0.5) for f in (0.0, 0.7, 0.85, 1.0)] == pytest.approx([1.0, 1.0, 0.75, 0.5])
    assert tg.muon_wd_multiplier(0.9, 1.0) == 1.0  # the default: no taper
    W = nn.Parameter(torch.ones(4, 4))
    W.grad = torch.zeros(4, 4)
    muon = tg.Muon([(W, slice(None))], lr=0.1, weight_decay=0.5, ns_steps=1, rank=0, world_size=1)
    muon.step(1.0, wd_mult=0.5)  # zero gradient: the step is the decay alone
    assert torch.allclose(W.detach(), torch.full((4, 4), 1 - 0.1 * 0.5 * 0.5))


def test_the_sequence_schedule_by_progress_and_its_checks():
    h = tg.Hyperparameters(train_seq_schedule="1024@0,2048@0.1,3072@0.7")
    schedule = h.seq_schedule()
    assert schedule == [(0.0, 1024), (0.1, 2048), (0.7, 3072)] and h.longest_sequence() == 3072
    assert [tg.sequence_length_at(f, schedule) for f in (0.0, 0.099, 0.1, 0.5, 0.7, 1.0)] == [1024, 1024, 2048, 2048, 3072, 3072]
    assert tg.Hyperparameters().seq_schedule() == [(0.0, 2048)]
    h.validate(8)  # 786,432 tokens divide into 8 ranks of 1024-, 2048- and 3072-token sequences
    for bad, message in [("1024@0.1,2048@0.5", "must start at 0"), ("1024@0,2048@0.5,3072@0.5", "rise below 1"), ("1024", "expected LEN@FRAC"), ("1000@0", "must be a multiple")]:
        with pytest.raises(ValueError, match=message):
            tg.Hyperparameters(train_seq_schedule=bad).validate(8)
    assert [tg.rewarm_multiplier(s, 32) for s in (0, 15, 31, 40)] == [1 / 32, 0.5, 1.0, 1.0] and tg.rewarm_multiplier(0, 0) == 1.0


def test_the_loader_cuts_sequences_of_the_current_length(tmp_path, tiny_data):
    h, rt, _, _, make_loader = _tiny_training(tmp_path, tiny_data, grad_accum_steps=1)
    loader = make_loader()
    x, _ = loader.next_batch()
    assert x.shape == (8, 32)  # 256 tokens per micro-step
    loader.set_seq_len(16, 16)
    for _ in range(3):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (16, 16) and x.numel() == 256


def test_progressive_context_switches_length_rewarms_and_keeps_tokens_per_step(tmp_path, tiny_data):
    """ITERATIONS=20 with lengths 16 then 32 from half-way: the first 10 steps see 16-token
    sequences, the rest 32, always 256 tokens per micro-step; the LR multiplier restarts at
    1/SEQ_REWARM_STEPS after the switch and ramps back; the warm-up runs every (length,
    looping) pair before the clock."""
    h, rt, model, opt, make_loader = _tiny_training(tmp_path, tiny_data, iterations=20, max_wallclock_seconds=1e6, grad_accum_steps=1, log_every=1, train_seq_schedule="16@0,32@0.5", seq_rewarm_steps=4, warmdown_frac=0.0)
    shapes, multipliers, lines = [], [], []
    original = model.hidden_states  # what the training loss calls once per micro-step
    model.hidden_states = lambda x, looping: shapes.append((tuple(x.shape), looping)) or original(x, looping=looping)
    step = opt.step
    opt.step = lambda lr_mult, momentum, clip, wd_mult: (multipliers.append(lr_mult), step(lr_mult, momentum, clip, wd_mult))[1]
    tg.train(model, opt, tg.WeightEMA(list(model.parameters()), h.ema_decay, h.ema_power), make_loader(), h, rt, lines.append)
    assert [s for s, _ in shapes] == [(16, 16)] * 10 + [(8, 32)] * 10
    assert multipliers == [1.0] * 10 + [0.25, 0.5, 0.75] + [1.0] * 7
    assert any(l.startswith("step 10: training length 16 -> 32") for l in lines)
    shapes.clear()
    tg.warm_up(model, opt, dataclasses.replace(h, warmup_steps=4), rt, make_loader, lambda msg: None)
    assert shapes == [((16, 16), False), ((16, 16), True), ((8, 32), False), ((8, 32), True)]


def test_a_graph_compiled_inside_the_timed_training_is_reported(tmp_path, tiny_data):
    """Every shape and loop mode compiles in the warm-up; a compile counted inside the timed
    loop (here faked through Dynamo's counter) is logged as a warning."""
    h, rt, model, opt, make_loader = _tiny_training(tmp_path, tiny_data, iterations=3, max_wallclock_seconds=1e6)
    lines = []
    tg.train(model, opt, tg.WeightEMA(list(model.parameters()), h.ema_decay, h.ema_power), make_loader(), h, rt, lines.append)
    assert not any("WARNING" in l for l in lines)
    original = model.hidden_states
    stats = torch._dynamo.utils.counters["stats"]

    def compiles_once(x, looping):
        stats["unique_graphs"] += 1
        return original(x, looping=looping)

    model.hidden_states = compiles_once
    tg.train(model, opt, tg.WeightEMA(list(model.parameters()), h.ema_decay, h.ema_power), make_loader(), h, rt, lines.append)
    assert any(l.startswith("WARNING: 24 graphs compiled inside the timed training") for l in lines)


def test_step_settings_are_the_whole_schedule():
    h = tg.Hyperparameters(train_seq_schedule="1024@0,2048@0.1,3072@0.7", seq_rewarm_steps=32, warmdown_frac=0.85)
    start = tg.step_settings(0, 0.0, h)
    assert start == (1.0, pytest.approx(0.92), 1.0, False, 1024)
    middle = tg.step_settings(1500, 0.5, h, switched_at=1490)
    assert middle.looping and middle.seq_len == 2048 and middle.lr_mult == pytest.approx(0.5 / 0.85 * 11 / 32) and middle.momentum == pytest.approx(0.97)  # warmdown x re-warm
    late = tg.step_settings(4000, 0.95, h)
    assert late.seq_len == 3072 and late.lr_mult == pytest.approx(max(0.10, 0.05 / 0.85)) and late.wd_mult == 1.0


@pytest.mark.parametrize("count", [0, 1, 7, 8, 33])
@pytest.mark.parametrize("world", [1, 3, 8])
def test_rank_share_deals_every_item_once_and_evenly(count, world):
    """The calibration's and the damage measurement's per-rank sequence counts add up to the total
    and differ by at most one."""
    shares = [tg.rank_share(count, tg.Runtime(r, world, r, torch.device("cpu"))) for r in range(world)]
    assert sum(shares) == count and max(shares) - min(shares) <= 1
