"""make_record.py: the statistics against closed forms and a hand computation, the folder it
writes from synthetic runs, and every refusal."""

import hashlib
import json
import math
import re
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT))
import make_record as mr  # noqa: E402


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.5, 7.0, -1.2])
def test_student_t_tail_matches_closed_forms(t):
    assert mr.student_t_upper_tail(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, abs=1e-12)  # Cauchy
    assert mr.student_t_upper_tail(t, 2) == pytest.approx(0.5 * (1 - t / math.sqrt(t * t + 2)), abs=1e-12)


@pytest.mark.parametrize("t, df, tail", [(2.228, 10, 0.025), (3.747, 4, 0.01), (2.015, 5, 0.05), (1.96, 1e6, 0.025)])
def test_student_t_tail_matches_tables(t, df, tail):
    assert mr.student_t_upper_tail(t, df) == pytest.approx(tail, abs=2e-4)


def test_welch_by_hand():
    """new 1.0, 1.2, 1.1: mean 1.1, s^2/n = 0.01/3; best 1.5, std 0.1, 3 seeds: s^2/n = 0.01/3.
    t = (1.5 - 0.005 - 1.1) / sqrt(0.02/3) = 4.8377; df = (0.02/3)^2 / (2 (0.01/3)^2 / 2) = 4."""
    t, df, p = mr.welch_one_sided([1.0, 1.2, 1.1], 1.5, 0.1, 3)
    assert t == pytest.approx(0.395 / math.sqrt(0.02 / 3), rel=1e-9)
    assert df == pytest.approx(4.0, rel=1e-9)
    # df = 4: P(T > t) = 1/2 - (3/8) u (1 - u^2/3) with u = t / sqrt(t^2 + 4) ... written as the exact CDF
    u = t / math.sqrt(t * t + 4)
    assert p == pytest.approx(0.5 - 0.5 * u * (1.5 - 0.5 * u * u), abs=1e-10)
    with pytest.raises(mr.RecordRefused, match="at least 2 runs"):
        mr.welch_one_sided([1.0], 1.5, 0.1, 3)


CODE = b"print('the counted code')\n"


def _run(folder, seed, loss, **changes):
    folder.mkdir(parents=True)
    summary = dict(
        run_id=f"run{seed}", seed=seed, steps=4500, val_bpb=loss / 2.58, val_loss=loss,
        val_bpb_stages=dict(raw=1.09, ema=1.088, quantized=1.097, sliding=1.089, ttt=loss / 2.58),
        final_stage="ttt", train_seconds=598.0, stage_seconds=dict(load_artifact=6.0, eval_quantized=3.0, eval_sliding=80.0, eval_ttt=300.0),
        eval_total_seconds=389.0, eval_scored_seconds=383.0, limits=dict(artifact_bytes=16_000_000, train_seconds=600.0, eval_seconds=600.0),
        artifact_bytes=dict(weights=15_960_000, code=len(CODE), total=15_960_000 + len(CODE)),
        code_sha256=hashlib.sha256(CODE).hexdigest(), hardware="NVIDIA H100 80GB HBM3 x8", torch="2.11",
        data=dict(validation_documents=50_000, validation_targets=40_540_160, validation_bytes=151_080_633, byte_sidecar=False,
                  validation_sha256="0123456789abcdef", train_shards=80, train_tokens=8_000_000_000),
    )
    for key, value in changes.items():
        target = summary
        *path, last = key.split(".")
        for part in path:
            target = target[part]
        target[last] = value
    (folder / "submission.json").write_text(json.dumps(summary))
    (folder / "runs").mkdir()
    (folder / "runs" / f"run{seed}.txt").write_text(f"log of seed {seed}\n")
    return folder


@pytest.fixture
def three_runs(tmp_path):
    code = tmp_path / "train_gpt.packed.py"
    code.write_bytes(CODE)
    runs = [_run(tmp_path / f"s{s}", s, loss) for s, loss in ((1, 2.7200), (2, 2.7210), (3, 2.7190))]
    return tmp_path, runs, code


BEST = dict(mean=2.7394, std=0.0007, n=3)


def test_record_folder_from_synthetic_runs(three_runs):
    tmp_path, runs, code = three_runs
    out = tmp_path / "record"
    text = mr.make_record(runs, code, out, BEST, ROOT / "requirements.txt")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "requirements.txt", "submission.json", "train_gpt.py", "train_seed1.txt", "train_seed2.txt", "train_seed3.txt"]
    assert (out / "train_gpt.py").read_bytes() == CODE
    assert (out / "train_seed2.txt").read_text() == "log of seed 2\n"
    summary = json.loads((out / "submission.json").read_text())
    assert summary["val_loss"] == pytest.approx(2.72) and summary["seeds"] == [1, 2, 3]
    t, df, p = mr.welch_one_sided([2.72, 2.721, 2.719], 2.7394, 0.0007, 3)
    assert summary["welch"]["p"] == pytest.approx(p, rel=1e-3) and p < 0.01
    head = {k: v for k, v in summary.items() if k != "runs"}  # what the tool computes: rounded, no 3.0576185000000002
    assert not re.search(r"\d\.\d{9,}", json.dumps(head))
    assert "| 2 | 4500 |" in text and "val_loss mean 2.72000 nats (std 0.00100)" in text
    assert "eval s" in text and "| 389.0 |" in text  # load + quantized + sliding + TTT
    assert "| seed | steps | raw bpb | ema bpb | quantized bpb | sliding bpb | ttt bpb |" in text  # the stages in the order the runs scored them
    assert "Limits (from the runs): artifact under 16,000,000 bytes; training 600 s; evaluation 600 s" in text and "the final stage, ttt" in text
    assert "**Verdict: clears the bar**" in text


def test_record_that_misses_the_bar_says_so(three_runs):
    tmp_path, runs, code = three_runs
    text = mr.make_record(runs, code, tmp_path / "record", dict(mean=2.7230, std=0.0007, n=3), ROOT / "requirements.txt")
    assert "**Verdict: does not clear the bar**" in text  # 0.003 better: less than 0.005


def test_large_but_noisy_gain_does_not_clear_the_bar(tmp_path):
    """Mean 0.019 nats better, but seeds 0.02 apart: p ~ 0.17, not < 0.01."""
    code = tmp_path / "train_gpt.packed.py"
    code.write_bytes(CODE)
    runs = [_run(tmp_path / f"s{s}", s, loss) for s, loss in ((1, 2.70), (2, 2.74), (3, 2.72))]
    text = mr.make_record(runs, code, tmp_path / "record", BEST, ROOT / "requirements.txt")
    assert "Difference -0.01940 nats" in text and "**Verdict: does not clear the bar**" in text


def test_best_score_from_another_record_folder(three_runs):
    tmp_path, runs, code = three_runs
    mr.make_record(runs, code, tmp_path / "best", BEST, ROOT / "requirements.txt")
    assert mr.best_from_folder(tmp_path / "best") == pytest.approx(dict(mean=2.72, std=0.001, n=3))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"artifact_bytes.total": 16_000_000}, "artifact 16,000,000 bytes, not under 16,000,000"),
        ({"train_seconds": 600.5}, "training took 600.5s, over 600s"),
        ({"eval_scored_seconds": 600.5}, "evaluation took 600.5s, over 600s"),  # the records' count
        ({"eval_total_seconds": 650.0, "eval_scored_seconds": 600.5}, "evaluation took 600.5s, over 600s"),
        ({"limits.eval_seconds": 900.0}, "held to different limits"),  # the limits are the runs' own: one set for all
        ({"limits.artifact_bytes": 15_000_000}, "held to different limits"),
        ({"code_sha256": "0" * 64}, "the runs' counted code differs"),
        ({"artifact_bytes.code": 5}, "counted a code size other than the --code file's"),
    ],
)
def test_refusals_write_nothing(three_runs, changes, message):
    tmp_path, runs, code = three_runs
    bad = _run(tmp_path / "bad", 4, 2.7205, **changes)
    out = tmp_path / "record"
    with pytest.raises(mr.RecordRefused, match=message):
        mr.make_record(runs + [bad], code, out, BEST, ROOT / "requirements.txt")
    assert not out.exists()


def test_one_run_counts_once_and_a_seed_once(three_runs):
    tmp_path, runs, code = three_runs
    with pytest.raises(mr.RecordRefused, match="s1 is given twice: one run counts once"):
        mr.make_record(runs + [runs[0]], code, tmp_path / "record", BEST, ROOT / "requirements.txt")
    again = _run(tmp_path / "again", 1, 2.7201)
    with pytest.raises(mr.RecordRefused, match="both ran seed 1: a record needs one run per seed"):
        mr.make_record(runs + [again], code, tmp_path / "record", BEST, ROOT / "requirements.txt")
    assert not (tmp_path / "record").exists()


def test_a_run_off_the_record_hardware_makes_only_an_example(three_runs):
    """A CPU or single-GPU run is refused as a record; with --not-a-record the folder is written
    and its README says it is an example, with the hardware."""
    tmp_path, runs, code = three_runs
    cpu = _run(tmp_path / "cpu", 4, 2.7205, hardware="cpu x1")
    with pytest.raises(mr.RecordRefused, match=r"cpu: ran on 'cpu x1', not 8xH100; --not-a-record makes an example folder"):
        mr.make_record(runs + [cpu], code, tmp_path / "record", BEST, ROOT / "requirements.txt")
    text = mr.make_record(runs + [cpu], code, tmp_path / "record", BEST, ROOT / "requirements.txt", not_a_record=True)
    assert text.startswith("# Example submission (not a record") and "Hardware: NVIDIA H100 80GB HBM3 x8, cpu x1" in text


def test_a_record_is_scored_on_the_challenges_validation_set_and_says_so(three_runs):
    """A record's runs were all scored on one validation set (one fingerprint) of the challenge's
    50,000 documents, and its README states the data; other data (the development corpus) makes
    only an example, and a summary that does not say which data it used is no record."""
    tmp_path, runs, code = three_runs
    text = mr.make_record(runs, code, tmp_path / "record", BEST, ROOT / "requirements.txt")
    assert "Data: 50,000 validation documents (the challenge's validation set), 40,540,160 scored targets" in text
    assert json.loads((tmp_path / "record" / "submission.json").read_text())["runs"][0]["data"]["validation_sha256"] == "0123456789abcdef"
    other = _run(tmp_path / "other", 4, 2.7205, **{"data.validation_sha256": "fedcba9876543210"})
    with pytest.raises(mr.RecordRefused, match="scored on different validation sets"):
        mr.make_record(runs + [other], code, tmp_path / "r1", BEST, ROOT / "requirements.txt", not_a_record=True)
    dev = [_run(tmp_path / f"dev{s}", s, 2.72 + s / 1000, **{"data.validation_documents": 971}) for s in (1, 2)]
    with pytest.raises(mr.RecordRefused, match=r"dev1: scored on 971 validation documents, not the challenge's 50,000; --not-a-record"):
        mr.make_record(dev, code, tmp_path / "r2", BEST, ROOT / "requirements.txt")
    text = mr.make_record(dev, code, tmp_path / "r2", BEST, ROOT / "requirements.txt", not_a_record=True)
    assert "971 validation documents (not the challenge's 50,000-document validation set)" in text
    assert "An example's verdict shows only how a record's is computed" in text
    old = _run(tmp_path / "old", 5, 2.7205, data=None)
    summary = json.loads((old / "submission.json").read_text()); del summary["data"]
    (old / "submission.json").write_text(json.dumps(summary))
    with pytest.raises(mr.RecordRefused, match="does not say which data the run used"):
        mr.make_record(runs + [old], code, tmp_path / "r3", BEST, ROOT / "requirements.txt")
    older = _run(tmp_path / "older", 6, 2.7205)
    summary = json.loads((older / "submission.json").read_text()); del summary["limits"]
    (older / "submission.json").write_text(json.dumps(summary))
    with pytest.raises(mr.RecordRefused, match=r"older: submission.json has no limits \(written by an older train_gpt.py\)"):
        mr.make_record(runs + [older], code, tmp_path / "r3", BEST, ROOT / "requirements.txt")
    assert not any((tmp_path / r).exists() for r in ("r1", "r3"))


def test_the_limit_holds_on_the_records_count_and_both_counts_are_reported(three_runs):
    """From the first scored token to the final score is what the records count; the strict
    count (load and compile warm-ups too) is reported beside it."""
    tmp_path, runs, code = three_runs
    over_strict = _run(tmp_path / "strict", 4, 2.7205, eval_total_seconds=640.0, eval_scored_seconds=480.0)
    text = mr.make_record(runs + [over_strict], code, tmp_path / "record", BEST, ROOT / "requirements.txt")
    assert "eval s (first scored token to score) | eval s (strict" in text and "| 480.0 | 640.0 |" in text


def test_refuses_code_that_is_not_the_counted_file_and_a_used_folder(three_runs):
    tmp_path, runs, code = three_runs
    other = tmp_path / "other.py"
    other.write_bytes(CODE + b"# edited after the runs\n")
    with pytest.raises(mr.RecordRefused, match="not the code the runs counted"):
        mr.make_record(runs, other, tmp_path / "record", BEST, ROOT / "requirements.txt")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    with pytest.raises(mr.RecordRefused, match="unfinished: no submission.json"):
        mr.make_record(runs + [unfinished], code, tmp_path / "record", BEST, ROOT / "requirements.txt")
    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("x")
    with pytest.raises(mr.RecordRefused, match="exists and is not empty"):
        mr.make_record(runs, code, used, BEST, ROOT / "requirements.txt")


def test_help_keeps_the_example_on_two_lines(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["make_record.py", "--help"])
    with pytest.raises(SystemExit):
        mr.main()
    text = capsys.readouterr().out
    assert "--out records/my_entry \\\n        --best-loss 2.7394" in text and "--not-a-record" in text
