"""The real script, end to end, on a tiny corpus and a tiny model (CPU, no compile), run inside a
clean copy of the checkout (which it must leave clean); its command line and its errors."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import train_gpt as tg

from conftest import ROOT
from tiny_data import QUICK_RUN_ENV

TINY_ENV = dict(QUICK_RUN_ENV, PACK_CODE="1", RUN_ID="smoke", CHECKPOINT_PATH="final.pt", TTT_ENABLED="1")  # every evaluation stage


def run_script(script, cwd, data_dir, *args, **extra):
    env = {**os.environ, **TINY_ENV, "DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "2", **extra}
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def final_bpb(log_text):
    return float(re.search(r"final val_bpb (\d+\.\d+)", log_text).group(1))


def git(repo, *args) -> str:
    return subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args], cwd=repo, capture_output=True, text=True, check=True).stdout


def clean_checkout(dest):
    """What is being tested as a fresh clone would hold it: the files git would track here
    (tracked, and untracked but not ignored), committed into a new repository at dest. None
    where the project is not a git work tree or git is missing."""
    try:
        listed = git(ROOT, "ls-files", "--cached", "--others", "--exclude-standard", "-z")
    except (OSError, subprocess.CalledProcessError):
        return None
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    git(dest, "init", "-q")
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", "snapshot")
    return dest


@pytest.fixture(scope="module")
def smoke_run(tiny_data, tmp_path_factory):
    """The quick run, inside a clean checkout where there is one; returns its run folder."""
    root, _ = tiny_data
    cwd = tmp_path_factory.mktemp("checkout")
    checkout = clean_checkout(cwd)
    proc = run_script((checkout or ROOT) / "train_gpt.py", cwd, root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd / "runs" / "smoke", root, proc


def test_a_run_leaves_the_checkout_clean(smoke_run):
    """Every output goes to runs/RUN_ID/, which git ignores: git status shows nothing new or changed."""
    folder, _, _ = smoke_run
    checkout = folder.parents[1]
    if not (checkout / ".git").exists():
        pytest.skip("the project is not a git work tree here")
    assert git(checkout, "status", "--porcelain") == ""
    assert {p.name for p in folder.iterdir()} == {"smoke.txt", "submission.json", "final_model.pgq", "train_gpt.packed.py", "final.pt"}


def test_training_run_reaches_the_end_and_writes_its_log(smoke_run):
    cwd, _, proc = smoke_run
    log = (cwd / "smoke.txt").read_text()
    for expected in [
        "hyperparameters:", "  NUM_LAYERS=4", "environment: python", "torch", "stage load_data",
        "step 4 loss", "tok/s", "stopped after 12 steps", "reached ITERATIONS=12", "weights frozen",
        "quantization steps: rounding damage", "artifact size fit", "eval raw: val_loss", "eval ema: val_loss", "stage gptq", "stage pack", "artifact: weights",
        "stage compile_eval", "eval quantized: val_loss", "eval sliding: val_loss", "stage compile_lora_ttt", "documents in", "eval lora_ttt: val_loss",
        "without the n-gram tilt", "stream n-gram hints", "eval ttt: val_loss", "evaluation took", "by the records' count", "quantization gap", "final val_bpb",
    ]:
        assert expected in log, expected
    assert log == proc.stdout  # rank 0 prints exactly what it logs
    last = log.splitlines()[-3:]  # where the outputs are, the size and times against the limits, the score
    assert last[0] == f"outputs in runs/smoke: smoke.txt (this log), submission.json, the artifact runs/smoke/final_model.pgq"
    assert re.fullmatch(r"artifact [\d,]+ bytes of the 16,000,000 limit; evaluation [\d.]+s strict, [\d.]+s by the records' count, of 600s", last[1])
    assert last[2].startswith("final val_bpb ")


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
    assert summary["data"]["validation_documents"] == 50 and summary["data"]["train_shards"] == 2  # tests/tiny_data.py's corpus
    assert summary["eval_total_seconds"] >= sum(summary["eval_seconds"].values()) + summary["stage_seconds"]["compile_lora_ttt"]
    assert summary["val_bpb"] == pytest.approx(summary["val_bpb_stages"]["lora_ttt"], abs=1e-6) and summary["final_stage"] == "lora_ttt"  # the final score
    assert list(summary["val_bpb_stages"]) == ["raw", "ema", "quantized", "lora_ttt", "sliding", "ttt"]  # in the order they ran: make_record.py's table follows it
    assert summary["limits"] == dict(artifact_bytes=tg.ARTIFACT_LIMIT_BYTES, train_seconds=tg.TRAIN_LIMIT_SECONDS, eval_seconds=tg.EVAL_LIMIT_SECONDS) == dict(artifact_bytes=16_000_000, train_seconds=600, eval_seconds=600)
    # the records' count: the quantized and LoRA TTT stages (the first scored token to the final score), not the load, compiles or the diagnostics after
    stages = summary["stage_seconds"]
    scored = stages["eval_quantized"] + stages["eval_lora_ttt"]  # each rounded to 0.01 s
    assert scored - 0.02 <= summary["eval_scored_seconds"] < scored + 1.0
    assert summary["eval_scored_seconds"] + stages["load_artifact"] + stages["compile_lora_ttt"] + stages["eval_sliding"] <= summary["eval_total_seconds"] + 0.04


def test_checkpoint_holds_the_unquantized_final_weights(smoke_run):
    """CHECKPOINT_PATH holds the EMA weights (what GPTQ quantizes): evaluated here they give the
    run's logged EMA score, not its raw one."""
    import torch

    import train_gpt as tg

    cwd, root, proc = smoke_run
    ckpt = torch.load(cwd / "final.pt")
    h = tg.Hyperparameters.from_env({**TINY_ENV, "DATA_DIR": str(root)})
    model = tg.GPT(h.model_config(), looping=ckpt["looping"])
    model.load_state_dict(ckpt["state_dict"])
    assert model.looping == ("depth recurrence on" in proc.stdout)
    tokens = tg.load_validation_tokens(tg.find_shards(h, "val"), h.eval_seq_len, h.vocab_size)
    tables = tg.build_byte_tables(tg.load_tokenizer(tg.tokenizer_path(h), h.vocab_size))
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"))
    bpb = tg.evaluate(model, tokens, tg.validation_target_bytes(tokens, tables), tg.Windows(h.eval_seq_len, None, h.eval_batch_seqs), rt).bpb
    logged = {label: float(re.search(rf"eval {label}: val_loss \S+ val_bpb (\S+)", proc.stdout).group(1)) for label in ("raw", "ema")}
    assert abs(logged["raw"] - logged["ema"]) > 1e-3  # the two are told apart
    assert bpb == pytest.approx(logged["ema"], abs=2e-5)


def test_quant_ab_remakes_the_runs_artifact_from_its_checkpoint(smoke_run, tmp_path):
    """bench/quant_ab.py with the run's own settings (variant base=) re-makes the run's artifact
    from its checkpoint: the same quantized score and bytes; a variant's setting reaches it."""
    cwd, root, proc = smoke_run
    ab = run_script(ROOT / "bench" / "quant_ab.py", tmp_path, root, str(cwd / "final.pt"), "base=", "calib4=GPTQ_CALIB_SEQS=4")
    assert ab.returncode == 0, ab.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in ab.stdout.splitlines() if line.startswith(("base ", "calib4 "))}
    logged = float(re.search(r"eval quantized: val_loss \S+ val_bpb (\S+)", proc.stdout).group(1))
    total = json.loads((cwd / "submission.json").read_text())["artifact_bytes"]["total"]
    assert float(rows["base"][1]) == pytest.approx(logged, abs=2e-5) and int(rows["base"][4].replace(",", "")) == total
    assert rows["calib4"][1] != rows["base"][1]
    bad = run_script(ROOT / "bench" / "quant_ab.py", tmp_path, root, str(cwd / "final.pt"), "x=GPTQ_CALIB=4")
    assert bad.returncode != 0 and "x: not hyperparameters: GPTQ_CALIB" in bad.stderr


def test_eval_ab_scores_the_runs_artifact_as_the_run_did(smoke_run, tmp_path):
    """bench/eval_ab.py with the run's settings (variant base=) gives the run's quantized and LoRA
    TTT scores (the whole set); a variant's setting reaches LoRA TTT; --docs N scores only the
    first N documents; a model setting or an unknown name is refused in one line."""
    cwd, root, proc = smoke_run
    args = ["--artifact", str(cwd / "final_model.pgq"), "--quiet", "--json", str(tmp_path / "ab.json")]
    ab = run_script(ROOT / "bench" / "eval_ab.py", tmp_path, root, *args, "base=", "beta0=NGRAM_TILT_BETA=0")
    assert ab.returncode == 0, ab.stderr[-3000:]
    rows = json.loads((tmp_path / "ab.json").read_text())["results"][str(cwd / "final_model.pgq")]
    logged = {k: float(v) for k, v in re.findall(r"eval (quantized|lora_ttt): val_loss \S+ val_bpb (\S+)", proc.stdout)}
    assert rows["base"]["quantized"] == pytest.approx(logged["quantized"], abs=2e-5)
    assert rows["base"]["lora_ttt"] == pytest.approx(logged["lora_ttt"], abs=2e-5)
    assert rows["beta0"]["lora_ttt"] == pytest.approx(rows["base"]["untilted"], abs=1e-9)  # no tilt: the untilted scores
    part = run_script(ROOT / "bench" / "eval_ab.py", tmp_path, root, *args, "--docs", "5", "base=")
    assert part.returncode == 0, part.stderr[-3000:]
    assert "LoRA TTT on 5 documents" in part.stdout
    assert json.loads((tmp_path / "ab.json").read_text())["results"][str(cwd / "final_model.pgq")]["base"]["lora_ttt"] != rows["base"]["lora_ttt"]
    for variant, message in [("x=MODEL_DIM=64", "x: MODEL_DIM not an evaluation setting"), ("x=LORA_TT_LR=1", "x: not hyperparameters: LORA_TT_LR")]:
        bad = run_script(ROOT / "bench" / "eval_ab.py", tmp_path, root, *args, variant)
        assert bad.returncode != 0 and message in bad.stderr and len(bad.stderr.splitlines()) == 1, bad.stderr


@pytest.mark.parametrize(
    "kind, message",
    [
        ("empty", "(0 bytes): empty"),
        ("truncated", "(10,000 bytes): artifact: corrupt rANS stream"),
        ("random", "(20,000 bytes): artifact: bad magic"),
        ("other model", "artifact was trained with MODEL_DIM=32, but MODEL_DIM=64 is set; leave it out"),
    ],
)
def test_a_bad_artifact_is_one_line_before_any_work(smoke_run, tmp_path, kind, message):
    """EVAL_ONLY with an artifact that is empty, cut short, not one at all or made for another
    model: one line on stderr, exit 2, nothing printed before it (no settings dump, no traceback)."""
    cwd, root, _ = smoke_run
    good = (cwd / "final_model.pgq").read_bytes()
    data = {"empty": b"", "truncated": good[:10_000], "random": bytes(range(256)) * 78 + bytes(32), "other model": good}[kind]
    artifact = tmp_path / "x.pgq"
    artifact.write_bytes(data)
    extra = dict(MODEL_DIM="64") if kind == "other model" else {}
    proc = run_script(ROOT / "train_gpt.py", tmp_path, root, EVAL_ONLY="1", ARTIFACT_PATH=str(artifact), **extra)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and message in proc.stderr, proc.stderr[-2000:]


def test_self_extracting_copy_evaluates_the_artifact_identically(smoke_run, tmp_path):
    cwd, root, proc = smoke_run
    packed = tmp_path / "train_gpt.py"
    packed.write_bytes((cwd / "train_gpt.packed.py").read_bytes())
    again = run_script(packed, tmp_path, root, EVAL_ONLY="1", ARTIFACT_PATH=str(cwd / "final_model.pgq"), RUN_ID="again", SLIDING_EVAL="0")
    assert again.returncode == 0, again.stderr[-3000:]
    assert final_bpb(again.stdout) == final_bpb(proc.stdout)
    assert "stage eval_lora_ttt" in again.stdout and "stage eval_ttt" in again.stdout and "warmup" not in again.stdout
    assert "stage eval_sliding" not in again.stdout  # SLIDING_EVAL=0 leaves out the diagnostic


def test_eval_only_rebuilds_the_model_from_the_artifact_alone(smoke_run, tmp_path):
    """EVAL_ONLY with none of the run's model settings in the environment (its 4 layers, width
    32, partial RoPE, lanes, loop, ...: all off the defaults) scores the artifact as the run did:
    the model comes from the artifact's header."""
    cwd, root, proc = smoke_run
    model_settings = {k.upper() for k in tg.ARCH_FIELDS}
    env = {k: v for k, v in {**os.environ, **TINY_ENV}.items() if k not in model_settings}
    assert model_settings & set(TINY_ENV) >= {"NUM_LAYERS", "MODEL_DIM", "ROPE_DIMS", "PARALLEL_FROM_LAYER", "TRAIN_SEQ_LEN"}
    env.update(DATA_DIR=str(root), OMP_NUM_THREADS="2", EVAL_ONLY="1", ARTIFACT_PATH=str(cwd / "final_model.pgq"), RUN_ID="bare", SLIDING_EVAL="0", TTT_ENABLED="0", VOCAB_SIZE=TINY_ENV["VOCAB_SIZE"])
    bare = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert bare.returncode == 0, bare.stderr[-3000:]
    assert final_bpb(bare.stdout) == final_bpb(proc.stdout) and "  NUM_LAYERS=4" in bare.stdout


def test_eval_only_decodes_the_artifact_once_and_counts_the_decode(smoke_run, tmp_path, monkeypatch):
    """EVAL_ONLY reads and decodes its artifact once (the check before any work), and the
    evaluation's strict time counts that decode although it ran before the evaluation's clock."""
    cwd, root, proc = smoke_run
    monkeypatch.chdir(tmp_path)
    for k, v in {**TINY_ENV, "DATA_DIR": str(root), "EVAL_ONLY": "1", "ARTIFACT_PATH": str(cwd / "final_model.pgq"), "RUN_ID": "once", "PACK_CODE": "0", "SLIDING_EVAL": "0", "TTT_ENABLED": "0"}.items():
        monkeypatch.setenv(k, v)
    unpack, decodes = tg.unpack_artifact, []

    def slow_unpack(*args):
        decodes.append(1)
        time.sleep(1.0)  # a decode the strict count must see
        return unpack(*args)

    monkeypatch.setattr(tg, "unpack_artifact", slow_unpack)
    assert tg.main() == 0
    summary = json.loads((tmp_path / "runs" / "once" / "submission.json").read_text())
    assert len(decodes) == 1
    assert summary["eval_total_seconds"] >= 1.0 + summary["stage_seconds"]["load_artifact"] + summary["eval_seconds"]["lora_ttt"]
    assert final_bpb((tmp_path / "runs" / "once" / "once.txt").read_text()) == final_bpb(proc.stdout)


def test_the_summary_writes_submission_json_and_the_closing_lines_from_one_object(tmp_path):
    """submission.json and the log's last lines come from one Summary: the same final score,
    artifact size and times; the stages in the order they ran; the challenge's limits."""
    ema, quantized, lora = (tg.EvalResult(nll * 1000, 1000 / 0.9 * 1.2, 900, 2.0) for nll in (0.81, 0.82, 0.78))
    training = tg.TrainingReport(tg.TrainResult(12, 3.0, "iterations", dict(before_looping=1000.0), False), 3.5, dict(ema=ema))
    evaluation = tg.EvaluationReport(dict(quantized=quantized, lora_ttt=lora), "lora_ttt", 9.25, 7.5)
    summary = tg.Summary(dict(run_id="r", seed=1), training, dict(weights=900, code=100, total=1000), evaluation, dict(load_artifact=0.5))
    files = tg.RunFiles.of(tg.Hyperparameters(out_dir=str(tmp_path), run_id="r"))
    out, lines = summary.as_json(), summary.closing_lines(files)
    assert list(out["val_bpb_stages"]) == ["ema", "quantized", "lora_ttt"] and out["final_stage"] == "lora_ttt" and out["steps"] == 12 and out["train_seconds"] == 3.5
    assert lines[-1] == f"final val_bpb {out['val_bpb']:.5f} (lora_ttt)" and out["val_bpb"] == round(lora.bpb, 6)
    assert lines[-2] == "artifact 1,000 bytes of the 16,000,000 limit; evaluation 9.2s strict, 7.5s by the records' count, of 600s"
    assert out["eval_total_seconds"] == 9.25 and out["eval_scored_seconds"] == 7.5 and out["limits"]["eval_seconds"] == tg.EVAL_LIMIT_SECONDS
    assert lines[0] == f"quantization gap: {quantized.bpb - ema.bpb:+.5f} bpb (quantized - EMA)"


def test_oversized_artifact_is_refused_without_a_score(tiny_data, tmp_path, monkeypatch):
    root, _ = tiny_data
    artifact = tmp_path / "big.pgq"
    artifact.write_bytes(b"\0" * 16_000_000)
    monkeypatch.chdir(tmp_path)
    for k, v in {**TINY_ENV, "DATA_DIR": str(root), "EVAL_ONLY": "1", "ARTIFACT_PATH": str(artifact), "PACK_CODE": "0", "RUN_ID": "big"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(tg.ArtifactTooLarge, match="not under the 16,000,000-byte limit; no score is reported"):
        tg.main()
    log = (tmp_path / "runs" / "big" / "big.txt").read_text()
    assert "val_bpb" not in log and not (tmp_path / "runs" / "big" / "submission.json").exists()


def test_bad_environment_value_fails_before_any_work(tiny_data, tmp_path):
    root, _ = tiny_data
    proc = run_script(ROOT / "train_gpt.py", tmp_path, root, NUM_HEADS="3", MAX_WALLCLOK_SECONDS="5")
    assert proc.returncode != 0
    assert proc.stderr.splitlines() == ["train_gpt.py: error: MAX_WALLCLOK_SECONDS: not a hyperparameter; did you mean MAX_WALLCLOCK_SECONDS? (unset MAX_WALLCLOK_SECONDS to run)"]  # one line, no traceback
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
        ("missing", r"DATA_DIR='.*nowhere': directory not found; VOCAB_SIZE=320 is not one of the challenge's downloads"),
        ("tokenizer", r"tokenizer .*broken_tokenizer/tokenizers/fineweb_320_bpe.model \(DATA_DIR/tokenizers/fineweb_<VOCAB_SIZE>_bpe.model\) is not a readable sentencepiece model"),
        ("token", r"broken_token/datasets/fineweb10B_sp320/fineweb_train_000001.bin: training token id 400 >= VOCAB_SIZE=320"),
    ],
)
def test_bad_data_ends_the_run_with_the_reason_in_the_log(tiny_data, tmp_path, monkeypatch, kind, message):
    """In process (no interpreter start-up per case): main() raises the clear error. One found
    in the set-up checks leaves no run folder; a bad token, found once training reads it, ends
    the run with the reason as its log's last line."""
    root, _ = tiny_data
    data_dir = _break_data(kind, root, tmp_path)
    monkeypatch.chdir(tmp_path)
    for k, v in {**TINY_ENV, "DATA_DIR": str(data_dir), "RUN_ID": f"bad_{kind}", "PACK_CODE": "0"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
        tg.main()
    folder = tmp_path / "runs" / f"bad_{kind}"
    if kind == "token":
        assert (folder / f"bad_{kind}.txt").read_text().splitlines()[-1] == f"error: {err.value}"
    else:
        assert not folder.exists()


def test_ctrl_c_is_one_line_in_the_log_and_exit_130(tiny_data, tmp_path, monkeypatch, capsys):
    """Ctrl-C during training: no traceback, one line naming the step and the run folder (in the
    log too), and the shell's code for an interrupt."""
    root, _ = tiny_data
    monkeypatch.chdir(tmp_path)
    for k, v in {**TINY_ENV, "DATA_DIR": str(root), "RUN_ID": "stopped", "PACK_CODE": "0"}.items():
        monkeypatch.setenv(k, v)
    step = tg.train_step
    calls = []

    def interrupted_at_the_fourth(*args, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return step(*args, **kw)

    monkeypatch.setattr(tg, "train_step", interrupted_at_the_fourth)
    monkeypatch.setattr(tg, "warm_up", lambda *a, **k: None)
    assert tg.main() == 130
    folder = tmp_path / "runs" / "stopped"
    line = f"interrupted at training step 3; partial outputs in {folder.relative_to(tmp_path)}"
    assert capsys.readouterr().out.splitlines()[-1] == line
    assert (folder / "stopped.txt").read_text().splitlines()[-1] == line


def test_a_failed_run_says_where_its_log_is(tiny_data, tmp_path, monkeypatch):
    """An error past the set-up: the log keeps it, and the exception's note names the log."""
    root, _ = tiny_data
    monkeypatch.chdir(tmp_path)
    for k, v in {**TINY_ENV, "DATA_DIR": str(root), "RUN_ID": "broken", "PACK_CODE": "0"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(tg, "warm_up", lambda *a, **k: None)
    monkeypatch.setattr(tg, "train_step", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("out of memory")))
    with pytest.raises(RuntimeError, match="out of memory") as err:
        tg.main()
    log = tmp_path / "runs" / "broken" / "broken.txt"
    assert log.read_text().splitlines()[-1] == "error: out of memory"
    assert err.value.__notes__ == [f"the run's log, with this error: {log.relative_to(tmp_path)}"]


def test_help_prints_every_hyperparameter_and_touches_nothing(tmp_path, monkeypatch, capsys):
    """--help / -h: what the script is, how to launch it, every hyperparameter with its default,
    range and meaning; exit 0 before the runtime (GPU), the data or any file is touched."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tg, "init_runtime", lambda: pytest.fail("--help started the runtime"))
    for flag in ("--help", "-h"):
        assert tg.main([flag]) == 0
        text = capsys.readouterr().out
        assert text.startswith(tg.__doc__.split("\n\n")[0]) and "torchrun --standalone --nproc_per_node=8 train_gpt.py" in text
        assert "  MAX_WALLCLOCK_SECONDS" in text and "  ATTENTION_BACKEND" in text and "auto|fa3|cudnn" in text
        assert "\nmodel:\n" in text and "training budget, GPTQ calibration included" in " ".join(text.split())  # wrapped
        column = text.index("names the run folder") - text.rindex("\n", 0, text.index("names the run folder")) - 1
        for line in text.splitlines():  # meanings wrap in their column; a long default puts its meaning on the next line
            assert len(line) <= 100 or " " not in line.strip(), line  # only an unbreakable word may pass 100
            if line.startswith(" " * column):
                assert line[column] != " ", line
    assert list(tmp_path.iterdir()) == []


def test_every_hyperparameter_has_a_meaning_in_help():
    meanings, sections = tg.hyperparameter_comments()
    fields = [f.name for f in tg.dataclasses.fields(tg.Hyperparameters)]
    assert [name for name in fields if not meanings.get(name)] == []  # document a new setting where it is defined
    assert set(sections) == set(fields) and sections["seed"] == "run and data" and sections["muon_lr"] == "optimizer"
    lines = {line.split()[0]: line for line in tg.usage().splitlines() if line.startswith("  ") and not line.startswith("    ")}  # not the wrapped meanings
    assert set(lines) == {name.upper() for name in fields}
    assert lines["WARMDOWN_FRAC"].split()[1:3] == [f"{tg.Hyperparameters.warmdown_frac:g}", "[0,"]
    assert lines["EVAL_ONLY"].split()[1:3] == ["0", "0|1"] and lines["RUN_ID"].split()[1] == "''"


def test_the_submitted_copy_has_help_without_the_comments(smoke_run, tmp_path):
    folder, root, _ = smoke_run
    proc = run_script(folder / "train_gpt.packed.py", tmp_path, root, "--help")
    assert proc.returncode == 0 and "  MAX_WALLCLOCK_SECONDS" in proc.stdout
    assert "(the meanings are in the comments of the readable train_gpt.py)" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_command_line_arguments_are_refused_in_one_line(tiny_data, tmp_path):
    root, _ = tiny_data
    proc = run_script(ROOT / "train_gpt.py", tmp_path, root, "--iterations=5")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "train_gpt.py: error: unexpected argument '--iterations=5': settings are environment variables (NAME=value python3 train_gpt.py); --help lists them\n"
    assert list(tmp_path.iterdir()) == []


def test_a_bad_data_dir_is_reported_once_before_anything_else(tiny_data, tmp_path):
    """The data is checked before the hyperparameters are logged: stdout stays empty and stderr
    holds the one line, no traceback."""
    root, _ = tiny_data
    proc = run_script(ROOT / "train_gpt.py", tmp_path, tmp_path / "nowhere")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"train_gpt.py: error: DATA_DIR={str(tmp_path / 'nowhere')!r}: directory not found; {tg.download_hint(tg.Hyperparameters(vocab_size=320))}"]


def test_only_rank_0_reports_a_setup_error(tiny_data, tmp_path):
    """Under torchrun every rank finds the same bad setting: the others exit quietly, same code."""
    root, _ = tiny_data
    for rank, expected in (("0", 1), ("3", 0)):
        proc = run_script(ROOT / "train_gpt.py", tmp_path, root, RANK=rank, LOG_DIR="old")
        assert proc.returncode == 2 and len(proc.stderr.splitlines()) == expected
    assert proc.stdout == "" and not (tmp_path / "runs").exists()


def test_eval_only_needs_an_artifact_path():
    with pytest.raises(ValueError, match="EVAL_ONLY=1: set ARTIFACT_PATH to the artifact to evaluate"):
        tg.Hyperparameters(eval_only=True).validate(1)
    with pytest.raises(ValueError, match="LOG_DIR: renamed to OUT_DIR"):
        tg.Hyperparameters.from_env({"LOG_DIR": "x"})


def test_a_removed_setting_is_refused_with_its_reason():
    with pytest.raises(ValueError, match="LORA_TTT_KEEP_A: removed: every document starts from the same A"):
        tg.Hyperparameters.from_env({"LORA_TTT_KEEP_A": "1"})
