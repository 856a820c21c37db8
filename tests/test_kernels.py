"""The fused Triton kernels (SPEEDUPS=1) against the plain PyTorch path they replace.

On the GPU they run for real; on a CPU with Triton installed the kernel logic runs in Triton's
interpreter (a subprocess, since the interpreter is chosen at import); without Triton they skip.
"""

import functools
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import ROOT, tiny_hyperparameters

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or tg.triton is None, reason="fused kernels run only on CUDA with Triton")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run_in_triton_interpreter(script: str):
    """Runs a test script in a fresh interpreter process with TRITON_INTERPRET=1 (the kernels then
    run on the CPU); the script prints "ok" when its checks pass."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout[-500:] + result.stderr[-2000:]


def loss_and_grads(loss_module, hidden, weight, targets):
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = loss_module(hidden, weight, targets)
    (loss * 3.0).backward()  # an upstream factor, as the 1/accum of gradient accumulation
    return loss.detach(), hidden.grad, weight.grad


def test_choose_kernels_keeps_the_plain_path_on_cpu():
    kernels = tg.choose_kernels(tiny_hyperparameters(speedups=True), torch.device("cpu"))
    assert kernels == tg.Kernels("math", "dense", False, False)
    assert tg.describe_kernels(kernels, tiny_hyperparameters(speedups=True)) == "attention math, fused loss and MLP off"
    kernels = tg.choose_kernels(tiny_hyperparameters(doc_mask=True), torch.device("cpu"))
    assert kernels.masks == "dense" and tg.describe_kernels(kernels, tiny_hyperparameters(doc_mask=True)) == "attention math, document masks dense, fused loss and MLP off"


@pytest.mark.skipif(tg.triton is None, reason="Triton is not installed")
def test_fused_loss_kernel_in_triton_interpreter():
    """fp32 on the CPU: the kernel's loss and gradient equal the plain path to fp32 rounding,
    for a vocabulary that is not a power of two, targets at both ends and saturating logits."""
    run_in_triton_interpreter(
        """
        import functools, torch, train_gpt as tg
        torch.manual_seed(0)
        plain, fused = tg.SoftcapTokenLoss(5.0), functools.partial(tg.SoftcapTokenLoss(5.0), fused=True)
        hidden, weight = torch.randn(40, 16) * 3, torch.randn(300, 16) * 2
        targets = torch.randint(0, 300, (40,))
        targets[:2] = torch.tensor([0, 299])
        out = []
        for module in (plain, fused):
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            loss = module(h, w, targets)
            loss.backward()
            with torch.no_grad():
                per_token = module(h, w, targets, "none")
            out.append((loss.detach(), per_token, h.grad, w.grad))
        for a, b in zip(*out):
            err = ((a - b).norm() / b.norm()).item()
            assert err < 1e-5, err
        print("ok")
        """
    )


@pytest.mark.skipif(tg.triton is None, reason="Triton is not installed")
def test_fused_mlp_kernels_in_triton_interpreter():
    """fp32 on the CPU, tiles smaller than the matrices, token, model and hidden widths that are
    not multiples of them (the descriptors' zero padding) and more tiles than programs (the
    persistent loop): the fused MLP's output and its three gradients (from the backward kernel)
    equal the plain path's; both signs of the pre-activation occur, so both slopes of the
    derivative are checked."""
    run_in_triton_interpreter(
        """
        import torch, torch.nn.functional as F, train_gpt as tg
        torch.manual_seed(0)
        tg.MLP_KERNEL_TILE.update(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=2)
        x, grad = torch.randn(2, 35, 40), torch.randn(2, 35, 40)
        w_fc, w_proj = torch.randn(100, 40) * 0.3, torch.randn(40, 100) * 0.3
        out = []
        for fused in (False, True):
            leaves = [t.clone().requires_grad_() for t in (x, w_fc, w_proj)]
            y = tg._FusedMLP.apply(*leaves) if fused else F.linear(F.leaky_relu(F.linear(leaves[0], leaves[1]), 0.5).square(), leaves[2])
            y.backward(grad)
            out.append([y.detach()] + [t.grad for t in leaves])
        for a, b in zip(*out):
            err = ((a - b).norm() / b.norm()).item()
            assert err < 1e-5, err
        print("ok")
        """
    )


@needs_gpu
@pytest.mark.parametrize("tokens", [(4, 256), (3, 100)])
def test_fused_mlp_matches_plain_path_on_gpu(tokens):
    """bf16 at the model's widths, eager and inside a compiled graph (the custom ops traced by
    Dynamo, as in the compiled blocks): output and gradients equal the plain path's within bf16
    rounding."""
    torch.manual_seed(0)
    x = torch.randn(*tokens, 512, device="cuda", dtype=torch.bfloat16)
    w_fc = torch.randn(2048, 512, device="cuda", dtype=torch.bfloat16) * 512**-0.5
    w_proj = torch.randn(512, 2048, device="cuda", dtype=torch.bfloat16) * 2048**-0.5
    grad = torch.randn_like(x)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (x, w_fc, w_proj)]
        y = fn(*leaves)
        y.backward(grad)
        return [y.detach()] + [t.grad for t in leaves]

    plain = run(lambda a, b, c: F.linear(F.leaky_relu(F.linear(a, b), 0.5).square(), c))
    for fused in (run(tg._FusedMLP.apply), run(torch.compile(lambda a, b, c: tg._FusedMLP.apply(a, b, c), fullgraph=True))):
        for a, b in zip(fused, plain):
            assert a.isfinite().all() and relative_error(a, b) < 1e-2


@needs_gpu
@pytest.mark.parametrize("vocab", [8192, 1000])
def test_fused_loss_matches_plain_path_on_gpu(vocab):
    torch.manual_seed(vocab)
    plain, fused = tg.SoftcapTokenLoss(30.0), functools.partial(tg.SoftcapTokenLoss(30.0), fused=True)
    hidden = torch.randn(4, 256, 512, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(vocab, 512, device="cuda") * 0.2  # logits up to ~±40: the cap matters
    targets = torch.randint(0, vocab, (4, 256), device="cuda")
    targets[0, :2] = torch.tensor([0, vocab - 1])
    ref = loss_and_grads(plain, hidden, weight, targets)
    got = loss_and_grads(fused, hidden, weight, targets)
    assert all(t.isfinite().all() for t in got)
    assert relative_error(got[0], ref[0]) < 1e-3
    assert relative_error(got[1], ref[1]) < 2e-2 and relative_error(got[2], ref[2]) < 2e-2  # bf16 gradients
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):  # the eval path: per-token, no gradient
        per_token = fused(hidden, weight, targets, "none")
        assert per_token.shape == (4 * 256,)
        assert relative_error(per_token, plain(hidden, weight, targets, "none")) < 1e-3


@needs_gpu
def test_cudnn_reads_grouped_kv_like_the_repeated_path():
    torch.backends.cuda.enable_cudnn_sdp(True)
    q = torch.randn(2, 512, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, 512, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    grads = []
    for backend in ("cudnn", "cudnn_repeat_kv"):
        out = tg.causal_attention(q, k, v, backend)
        grads.append((out.detach(), *torch.autograd.grad((out.float() ** 2).sum(), (q, k, v))))
    for a, b in zip(*grads):
        assert relative_error(a, b) < 1e-2


@needs_gpu
def test_training_step_with_and_without_speedups_agree_on_gpu():
    """One forward/backward of a small model, SPEEDUPS on vs off: same loss and gradients
    within bf16 noise."""
    h = tiny_hyperparameters(vocab_size=1024, model_dim=128, num_heads=4, num_kv_heads=2, rope_dims=16, train_seq_len=256)
    ids = torch.randint(0, h.vocab_size, (4, 257), device="cuda")
    results = []
    for speedups in (False, True):
        torch.manual_seed(0)
        kernels = tg.choose_kernels(tiny_hyperparameters(speedups=speedups), torch.device("cuda"))
        model = tg.GPT(h.model_config(), kernels).cuda()
        for p in model.parameters():  # the zero-initialised projections would hide the blocks
            p.data.add_(torch.randn_like(p) * 0.02)
        assert model.kernels.fused_loss == speedups
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        results.append((loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (loss_plain, grads_plain), (loss_fast, grads_fast) = results
    assert abs(loss_fast.item() - loss_plain.item()) < 1e-3 * loss_plain.item()
    assert relative_error(grads_fast, grads_plain) < 2e-2


@pytest.fixture
def sdpa_flags():
    """use_sdpa_backend sets SDPA's global backend flags, which the CPU's SDPA reads too: restored."""
    cuda = torch.backends.cuda
    saved = (cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled())
    yield
    for enable, on in zip((cuda.enable_cudnn_sdp, cuda.enable_flash_sdp, cuda.enable_mem_efficient_sdp), saved):
        enable(on)


def test_auto_attention_takes_fa3_for_every_use_where_it_imports(monkeypatch, sdpa_flags):
    """ATTENTION_BACKEND=auto follows the measured table (FA3 fastest at the training, LoRA TTT
    and evaluation shapes) and says so in the log; without FA3 it takes cuDNN and says why."""
    cuda = torch.device("cuda")

    def summary(h):
        kernels = tg.choose_kernels(h, cuda)
        tg.use_sdpa_backend(kernels)
        return kernels, tg.describe_kernels(kernels, h)

    monkeypatch.setattr(tg, "flash_attn_3", object())
    kernels, said = summary(tiny_hyperparameters())
    assert said.startswith("attention fa3 for training, LoRA TTT and the evaluation windows (auto: the fastest measured at each)")
    assert kernels.attention == "fa3"
    monkeypatch.setattr(tg, "flash_attn_3", None)
    kernels, said = summary(tiny_hyperparameters(speedups=False))
    assert said.startswith("attention cudnn_repeat_kv (auto: FlashAttention-3 is not importable)")
    assert torch.backends.cuda.cudnn_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
    assert summary(tiny_hyperparameters(attention_backend="cudnn"))[1].startswith("attention cudnn,")
