"""bench/ab.py's report (the differences every A/B table in the README comes from) and run plan;
bench/eval_ab.py's prefix of the validation set; bench/timing_artifact.py."""

import importlib.util
import json
from dataclasses import replace

import pytest
import torch

import train_gpt as tg

from conftest import ROOT

spec = importlib.util.spec_from_file_location("ab", ROOT / "bench" / "ab.py")
ab = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ab)
spec = importlib.util.spec_from_file_location("eval_ab", ROOT / "bench" / "eval_ab.py")
eval_ab = importlib.util.module_from_spec(spec)
spec.loader.exec_module(eval_ab)


def _result(out, name, seed, ema, quantized, tok_s=1000):
    run = out / f"{name}_s{seed}"
    run.mkdir(parents=True)
    summary = dict(steps=100, val_bpb_stages=dict(raw=ema - 0.01, ema=ema, quantized=quantized), train_tokens_per_second=dict(before_looping=tok_s, looping=tok_s // 2), artifact_bytes=dict(total=15_000_000))
    (run / "submission.json").write_text(json.dumps(summary))


def test_report_gives_per_seed_and_mean_differences_and_the_quantization_gap(tmp_path):
    _result(tmp_path, "base", 1, ema=1.700, quantized=1.702)
    _result(tmp_path, "base", 2, ema=1.690, quantized=1.693)
    _result(tmp_path, "b", 1, ema=1.710, quantized=1.711, tok_s=980)  # worse training, smaller gap
    _result(tmp_path, "b", 2, ema=1.680, quantized=1.682, tok_s=1000)
    table = ab.report(tmp_path, ["base", "b"], [1, 2])
    assert "  ema       mean +0.00000  per seed [+0.01000, -0.01000]" in table
    assert "  quantized mean -0.00100  per seed [+0.00900, -0.01100]" in table
    assert "  gap       mean -0.00100  per seed [-0.00100, -0.00100]" in table  # (1.711-1.710)-(1.702-1.700), ...
    assert "  tok/s before_looping -1.0%" in table


def test_report_names_a_missing_run_and_compares_the_seeds_that_have_both(tmp_path):
    _result(tmp_path, "base", 1, ema=1.700, quantized=1.702)
    _result(tmp_path, "base", 2, ema=1.690, quantized=1.693)
    _result(tmp_path, "b", 1, ema=1.705, quantized=1.706)
    table = ab.report(tmp_path, ["base", "b"], [1, 2])
    assert "  b seed 2: no result" in table
    assert "  quantized mean +0.00400  per seed [+0.00400]" in table


def test_eval_only_plan_trains_once_per_seed_and_evaluates_its_artifact(tmp_path):
    variants = {"base": {}, "phases": {"LORA_TTT_PHASES": "3"}, "beta2": {"NGRAM_TILT_BETA": "2"}}
    common = {"ITERATIONS": "100"}
    assert ab.plan(tmp_path, variants, [1, 2], common, eval_only=False) == [[(n, {**common, **e}, s)] for s in (1, 2) for n, e in variants.items()]
    chains = ab.plan(tmp_path, variants, [1, 2], common, eval_only=True)
    assert [[(name, seed) for name, _, seed in chain] for chain in chains] == [[("base", 1), ("phases", 1), ("beta2", 1)], [("base", 2), ("phases", 2), ("beta2", 2)]]
    for chain in chains:
        (_, train_env, seed), *evals = chain
        assert "EVAL_ONLY" not in train_env and train_env["ITERATIONS"] == "100"
        for name, env, _ in evals:
            assert env["EVAL_ONLY"] == "1" and env["ARTIFACT_PATH"] == str(tmp_path / f"base_s{seed}" / "final_model.pgq")
            assert all(env[k] == v for k, v in variants[name].items())


def test_report_of_evaluation_only_runs(tmp_path):
    _result(tmp_path, "base", 1, ema=1.700, quantized=1.702)
    run = tmp_path / "b_s1"
    run.mkdir()
    (run / "submission.json").write_text(json.dumps(dict(val_bpb_stages=dict(quantized=1.702, lora_ttt=1.650), artifact_bytes=dict(total=15_000_000))))
    table = ab.report(tmp_path, ["base", "b"], [1])
    assert "  b seed 1: evaluation only, quantized 1.70200 lora_ttt 1.65000" in table
    assert "  quantized mean +0.00000  per seed [+0.00000]" in table


def test_timing_artifact_loads_as_a_looping_model():
    from conftest import tiny_hyperparameters

    spec = importlib.util.spec_from_file_location("timing_artifact", ROOT / "bench" / "timing_artifact.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    h = tiny_hyperparameters(artifact_target_bytes=0, lqer_rank=0)
    state, looping = module.tg.unpack_artifact(module.timing_artifact(h), h)
    model = module.tg.GPT(h.model_config())
    model.load_state_dict(state)
    assert looping and set(state) == set(model.state_dict())


def test_eval_ab_selection_keeps_whole_documents_in_stream_order():
    """--docs N keeps the first N documents whole (the last target is the BOS that starts the next
    document), --max-doc-targets leaves out the longer ones; every kept document keeps its targets'
    bytes, and the whole set comes back untouched when nothing is left out."""
    bos = tg.BOS_ID
    tokens = torch.tensor([bos, 5, 6, bos, 7, bos, 8, 9, 10, bos, 11])
    nbytes = torch.arange(1.0, len(tokens))  # target k has k + 1 bytes: each target's own
    kept, kept_bytes = eval_ab.select_documents(tokens, nbytes, 2, None)
    assert kept.tolist() == [bos, 5, 6, bos, 7, bos] and kept_bytes.tolist() == [1, 2, 3, 4, 5]
    kept, kept_bytes = eval_ab.select_documents(tokens, nbytes, None, 2)  # documents 2 and 4 (2 and 1 targets)
    assert kept.tolist() == [bos, 7, bos, 11] and kept_bytes.tolist() == [4, 5, 10]
    assert tg.document_spans(kept) == [(0, 2), (2, 3)]
    whole = eval_ab.select_documents(tokens, nbytes, 9, None)
    assert whole[0] is tokens and whole[1] is nbytes


def test_eval_ab_says_when_a_window_variant_cannot_matter():
    """A window variant is flagged when the longest selected document fits in both windows, and
    not when some document is longer than the smaller window (nor for variants of the same window)."""
    h = tg.Hyperparameters.from_env({})
    variants = [("base", h), ("w2560", replace(h, lora_ttt_seq_len=2560)), ("lr", replace(h, lora_ttt_lr=1e-4)), ("same", replace(h, lora_ttt_seq_len=h.eval_seq_len))]
    assert eval_ab.window_blind(variants, 2008) == ["w2560"]
    assert eval_ab.window_blind(variants, h.eval_seq_len + 1) == []


def test_eval_ab_builds_rope_for_every_variants_window_as_its_own_run_would():
    """The one model's RoPE tables cover the longest variant window, with the angles that variant's
    own run (LORA_TTT_SEQ_LEN set) builds at every position, and the base's at the base's
    positions; a model built for the base window alone would rescale them (the bug it guards)."""
    h = tg.Hyperparameters.from_env({})
    variants = [("base", h), ("w2560", replace(h, lora_ttt_seq_len=2560)), ("lr", replace(h, lora_ttt_lr=1e-4))]
    built = eval_ab.model_settings(h, variants)

    def rope(s):
        return tg.PartialRotary(s.rope_dims, s.rope_base, s.train_seq_len, s.longest_sequence())

    x = torch.randn(1, 2560, 2, h.model_dim // h.num_heads)
    assert torch.equal(rope(built)(x), rope(variants[1][1])(x))
    assert torch.equal(rope(built)(x[:, : h.eval_seq_len]), rope(h)(x[:, : h.eval_seq_len]))
    assert not torch.allclose(rope(h)(x)[:, :100], rope(built)(x)[:, :100])  # base-only tables, run at 2560: rescaled


def test_eval_ab_refuses_a_variant_whose_rope_its_own_run_would_rescale():
    """EVAL_SEQ_LEN past a variant's own tables is rescaled in its run; beside a longer
    LORA_TTT_SEQ_LEN variant the shared model would not rescale it: refused. Alone, it is not."""
    h = tg.Hyperparameters.from_env({})
    long_eval = ("eval2560", replace(h, eval_seq_len=2560))
    with pytest.raises(SystemExit, match="eval2560: its run rescales RoPE past 2048 positions"):
        eval_ab.model_settings(h, [("base", h), ("w3072", replace(h, lora_ttt_seq_len=3072)), long_eval])
    assert eval_ab.model_settings(h, [("base", h), long_eval]).longest_sequence() == 2048
