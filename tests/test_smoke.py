"""The real script, end to end, on a tiny corpus and a tiny model (CPU, no compile)."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import train_gpt as tg

from conftest import ROOT
from tiny_data import QUICK_RUN_ENV

TINY_ENV = dict(QUICK_RUN_ENV, PACK_CODE="1", RUN_ID="smoke", CHECKPOINT_PATH="final.pt", TTT_ENABLED="1")  # every evaluation stage


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
    log = (cwd / "runs" / "smoke.txt").read_text()
    for expected in [
        "hyperparameters:", "  NUM_LAYERS=4", "environment: python", "torch", "stage load_data",
        "step 4 loss", "tok/s", "stopped after 12 steps", "reached ITERATIONS=12", "weights frozen",
        "quantization steps: rounding damage", "artifact size fit", "eval raw: val_loss", "eval ema: val_loss", "stage gptq", "stage pack", "artifact: weights",
        "stage compile_eval", "eval quantized: val_loss", "eval sliding: val_loss", "stage compile_lora_ttt", "documents in", "eval lora_ttt: val_loss",
        "without the n-gram tilt", "eval ttt: val_loss", "evaluation took", "quantization gap", "final val_bpb",
    ]:
        assert expected in log, expected
    assert log == proc.stdout  # rank 0 prints exactly what it logs


def test_submission_json(smoke_run):
    cwd, _, proc = smoke_run
    summary = json.loads((cwd / "submission.json").read_text())
    assert summary["val_bpb"] == pytest.approx(final_bpb(proc.stdout), abs=1e-5)
    assert set(summary["val_bpb_stages"]) == {"raw", "ema", "quantized", "sliding", "lora_ttt", "ttt"}
    assert summary["steps"] == 12 and summary["seed"] == 1337
    sizes = summary["artifact_bytes"]
    assert sizes["total"] == sizes["weights"] + sizes["code"] < 16_000_000
    assert sizes["weights"] == (cwd / "final_model.pgq").stat().st_size
    assert sizes["code"] == (cwd / "train_gpt.packed.py").stat().st_size
    assert summary["code_sha256"] == hashlib.sha256((cwd / "train_gpt.packed.py").read_bytes()).hexdigest()
    assert summary["torch"] and summary["hardware"] and summary["eval_seconds"]["lora_ttt"] > 0
    assert summary["eval_total_seconds"] >= sum(summary["eval_seconds"].values()) + summary["stage_seconds"]["compile_lora_ttt"]
    assert summary["val_bpb"] == pytest.approx(summary["val_bpb_stages"]["lora_ttt"], abs=1e-6)  # the final score


def test_checkpoint_holds_the_unquantized_final_weights(smoke_run):
    """CHECKPOINT_PATH holds the EMA weights (what GPTQ quantizes): evaluated here they give the
    run's logged EMA score, not its raw one."""
    import torch

    import train_gpt as tg

    cwd, root, proc = smoke_run
    ckpt = torch.load(cwd / "final.pt")
    h = tg.Hyperparameters.from_env({**TINY_ENV, "DATA_DIR": str(root)})
    model = tg.GPT(h)
    model.load_state_dict(ckpt["state_dict"])
    model.looping = ckpt["looping"]
    assert model.looping == ("depth recurrence on" in proc.stdout)
    tokens = tg.load_validation_tokens(tg.find_shards(h, "val"), h.eval_seq_len, h.vocab_size)
    tables = tg.build_byte_tables(tg.load_tokenizer(tg.tokenizer_path(h), h.vocab_size))
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"))
    bpb = tg.evaluate(model, tokens, tg.validation_target_bytes(tokens, tables), h.eval_seq_len, None, h.eval_batch_seqs, rt).bpb
    logged = {label: float(re.search(rf"eval {label}: val_loss \S+ val_bpb (\S+)", proc.stdout).group(1)) for label in ("raw", "ema")}
    assert abs(logged["raw"] - logged["ema"]) > 1e-3  # the two are told apart
    assert bpb == pytest.approx(logged["ema"], abs=2e-5)


def test_self_extracting_copy_evaluates_the_artifact_identically(smoke_run, tmp_path):
    cwd, root, proc = smoke_run
    packed = tmp_path / "train_gpt.py"
    packed.write_bytes((cwd / "train_gpt.packed.py").read_bytes())
    again = run_script(packed, tmp_path, root, EVAL_ONLY="1", ARTIFACT_PATH=str(cwd / "final_model.pgq"), RUN_ID="again", SLIDING_EVAL="0")
    assert again.returncode == 0, again.stderr[-3000:]
    assert final_bpb(again.stdout) == final_bpb(proc.stdout)
    assert "stage eval_lora_ttt" in again.stdout and "stage eval_ttt" in again.stdout and "warmup" not in again.stdout
    assert "stage eval_sliding" not in again.stdout  # SLIDING_EVAL=0 leaves out the diagnostic


def test_oversized_artifact_is_refused_without_a_score(tiny_data, tmp_path, monkeypatch):
    root, _ = tiny_data
    artifact = tmp_path / "big.pgq"
    artifact.write_bytes(b"\0" * 16_000_000)
    monkeypatch.chdir(tmp_path)
    for k, v in {**TINY_ENV, "DATA_DIR": str(root), "EVAL_ONLY": "1", "ARTIFACT_PATH": str(artifact), "PACK_CODE": "0", "RUN_ID": "big"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(tg.ArtifactTooLarge, match="not under the 16,000,000-byte limit; no score is reported"):
        tg.main()
    log = (tmp_path / "runs" / "big.txt").read_text()
    assert "val_bpb" not in log and not (tmp_path / "submission.json").exists()


def test_bad_environment_value_fails_before_any_work(tiny_data, tmp_path):
    root, _ = tiny_data
    proc = run_script(ROOT / "train_gpt.py", tmp_path, root, NUM_HEADS="3", MAX_WALLCLOK_SECONDS="5")
    assert proc.returncode != 0
    first = proc.stderr.splitlines()[0]  # one clear line first, the traceback after it
    assert first == "train_gpt.py: error: MAX_WALLCLOK_SECONDS: not a hyperparameter; did you mean MAX_WALLCLOCK_SECONDS? (unset MAX_WALLCLOK_SECONDS to run)"
    assert not (tmp_path / "runs").exists() and not (tmp_path / "logs").exists()


def _break_data(kind, data_dir, tmp_path):
    """A DATA_DIR with one defect: missing, a corrupt tokenizer, or an out-of-vocabulary token."""
    if kind == "missing":
        return tmp_path / "nowhere"
    broken = tmp_path / f"broken_{kind}"
    shutil.copytree(data_dir, broken)
    if kind == "tokenizer":
        (broken / "tokenizers" / "fineweb_320_bpe.model").write_bytes(b"\0garbage")
    else:  # a token id past the vocabulary in the second train shard
        shard = broken / "datasets" / "fineweb10B_sp320" / "fineweb_train_000001.bin"
        tokens = np.asarray(tg.read_shard(shard)).copy()
        tokens[::50] = 400
        tg.write_shard(shard, tokens)
    return broken


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", r"DATA_DIR='.*nowhere': directory not found; download it from the challenge repository root with `python3 data/cached_challenge_fineweb.py --variant sp320`"),
        ("tokenizer", r"tokenizer .*broken_tokenizer/tokenizers/fineweb_320_bpe.model \(DATA_DIR/tokenizers/fineweb_<VOCAB_SIZE>_bpe.model\) is not a readable sentencepiece model"),
        ("token", r"broken_token/datasets/fineweb10B_sp320/fineweb_train_000001.bin: training token id 400 >= VOCAB_SIZE=320"),
    ],
)
def test_bad_data_ends_the_run_with_the_reason_in_the_log(tiny_data, tmp_path, monkeypatch, kind, message):
    """In process (no interpreter start-up per case): main() raises the clear error and the log
    file's last line records it."""
    root, _ = tiny_data
    data_dir = _break_data(kind, root, tmp_path)
    monkeypatch.chdir(tmp_path)
    for k, v in {**TINY_ENV, "DATA_DIR": str(data_dir), "RUN_ID": f"bad_{kind}", "PACK_CODE": "0"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
        tg.main()
    assert (tmp_path / "runs" / f"bad_{kind}.txt").read_text().splitlines()[-1] == f"error: {err.value}"
