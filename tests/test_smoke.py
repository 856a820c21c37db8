"""The real script, end to end, on a tiny corpus and a tiny model (CPU, no compile)."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, TINY_VOCAB

TINY_ENV = dict(
    VOCAB_SIZE=str(TINY_VOCAB), NUM_LAYERS="4", MODEL_DIM="32", NUM_HEADS="4", NUM_KV_HEADS="2", MLP_MULT="2",
    ROPE_DIMS="4", PARALLEL_FROM_LAYER="3", LOOP_START="1", LOOP_END="2", NUM_LOOPS="1", TRAIN_SEQ_LEN="32",
    EVAL_SEQ_LEN="32", EVAL_STRIDE="16", EVAL_BATCH_SEQS="16", TTT_CHUNK_TOKENS="512", TTT_BATCH_SEQS="16",
    TRAIN_BATCH_TOKENS="512", COMPILE="0", WARMUP_STEPS="2", ITERATIONS="12", MAX_WALLCLOCK_SECONDS="300",
    GPTQ_RESERVE_SECONDS="5", PASSTHROUGH_MAX_NUMEL="4096", GPTQ_CALIB_SEQS="8", LOG_EVERY="4",
    COMPRESS_LEVEL="6", PACK_CODE="1", RUN_ID="smoke", CHECKPOINT_PATH="final.pt",
)


def run_script(script, cwd, data_dir, **extra):
    env = {**os.environ, **TINY_ENV, "DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "2", **extra}
    return subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def final_bpb(log_text):
    return float(re.search(r"final val_bpb (\d+\.\d+)", log_text).group(1))


@pytest.fixture(scope="module")
def smoke_run(tiny_data, tmp_path_factory):
    root, _ = tiny_data
    cwd = tmp_path_factory.mktemp("run")
    proc = run_script(ROOT / "train_gpt.py", cwd, root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, root, proc


def test_training_run_reaches_the_end_and_writes_its_log(smoke_run):
    cwd, _, proc = smoke_run
    log = (cwd / "logs" / "smoke.txt").read_text()
    for expected in [
        "hyperparameters:", "  NUM_LAYERS=4", "environment: python", "torch", "stage load_data",
        "step 4 loss", "tok/s", "stopped after 12 steps", "reached ITERATIONS=12", "weights frozen",
        "quantization steps: rounding damage", "artifact size fit", "eval raw: val_loss", "eval ema: val_loss", "stage gptq", "stage pack", "artifact: weights",
        "eval quantized: val_loss", "eval sliding: val_loss", "eval ttt: val_loss", "quantization gap",
        "final val_bpb",
    ]:
        assert expected in log, expected
    assert log == proc.stdout  # rank 0 prints exactly what it logs


def test_submission_json(smoke_run):
    cwd, _, proc = smoke_run
    summary = json.loads((cwd / "submission.json").read_text())
    assert summary["val_bpb"] == pytest.approx(final_bpb(proc.stdout), abs=1e-5)
    assert set(summary["val_bpb_stages"]) == {"raw", "ema", "quantized", "sliding", "ttt"}
    assert summary["steps"] == 12 and summary["seed"] == 1337
    sizes = summary["artifact_bytes"]
    assert sizes["total"] == sizes["weights"] + sizes["code"] < 16_000_000
    assert sizes["weights"] == (cwd / "final_model.pgq").stat().st_size
    assert sizes["code"] == (cwd / "train_gpt.packed.py").stat().st_size
    assert summary["torch"] and summary["hardware"] and summary["eval_seconds"]["ttt"] > 0


def test_checkpoint_holds_the_unquantized_final_weights(smoke_run):
    import torch

    cwd, _, _ = smoke_run
    ckpt = torch.load(cwd / "final.pt")
    assert ckpt["looping"] in (True, False)
    assert "tok_emb.weight" in ckpt["state_dict"] and ckpt["state_dict"]["tok_emb.weight"].dtype == torch.float32


def test_self_extracting_copy_evaluates_the_artifact_identically(smoke_run, tmp_path):
    cwd, root, proc = smoke_run
    packed = tmp_path / "train_gpt.py"
    packed.write_bytes((cwd / "train_gpt.packed.py").read_bytes())
    again = run_script(packed, tmp_path, root, EVAL_ONLY="1", ARTIFACT_PATH=str(cwd / "final_model.pgq"), RUN_ID="again")
    assert again.returncode == 0, again.stderr[-3000:]
    assert final_bpb(again.stdout) == final_bpb(proc.stdout)
    assert "stage eval_ttt" in again.stdout and "warmup" not in again.stdout


def test_oversized_artifact_is_refused_without_a_score(tiny_data, tmp_path):
    root, _ = tiny_data
    artifact = tmp_path / "big.pgq"
    artifact.write_bytes(b"\0" * 16_000_000)
    proc = run_script(ROOT / "train_gpt.py", tmp_path, root, EVAL_ONLY="1", ARTIFACT_PATH=str(artifact), PACK_CODE="0")
    assert proc.returncode != 0
    assert "not under the 16,000,000-byte limit" in proc.stderr and "no score is reported" in proc.stderr
    assert "val_bpb" not in proc.stdout and not (tmp_path / "submission.json").exists()


def test_bad_environment_value_fails_before_any_work(tiny_data, tmp_path):
    root, _ = tiny_data
    proc = run_script(ROOT / "train_gpt.py", tmp_path, root, NUM_HEADS="3")
    assert proc.returncode != 0 and "NUM_HEADS=3: must divide MODEL_DIM=32" in proc.stderr
    assert not (tmp_path / "logs").exists()
