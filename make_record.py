r"""Builds a leaderboard record folder from the runs of one submission, and says whether it clears
the challenge's bar: at least 0.005 nats better than the best entry, one-sided p < 0.01.

    python3 make_record.py --runs runs/seed1 runs/seed2 runs/seed3 --out records/my_entry \
        --best-loss 2.7394 --best-std 0.0007 --best-seeds 3       # or: --best-folder records/best

Each run folder (what train_gpt.py writes to OUT_DIR/RUN_ID/) holds the run's submission.json, its
log (<run_id>.txt, there or in runs/) and the counted code train_gpt.packed.py (--code: another file).
The folder written: README.md (per-seed table, mean and standard deviation, the test and its
verdict), submission.json (the runs and their means), the logs, train_gpt.py (the counted code)
and requirements.txt. It refuses, writing nothing, if a run's artifact is 16,000,000 bytes or
more, its training or evaluation (the records' count: first scored token to final score) passed
600 s, the runs' counted code differs, the file given as --code is not that code, a folder
is given twice or two runs share a seed, the runs were scored on different validation sets, a
run is not on 8xH100 or not on the challenge's 50,000 validation documents (--not-a-record: an
example folder that says so), or the output folder exists and is not empty.
"""

import argparse
import hashlib
import json
import math
import re
import shutil
import statistics
from pathlib import Path

REQUIRED_GAIN_NATS = 0.005
SIGNIFICANCE = 0.01
# The limits (artifact bytes, training and evaluation seconds) and the stages' names and order are
# train_gpt.py's: each run's submission.json carries them ("limits"; "val_bpb_stages" in the order
# the run scored them, "final_stage"), and they are read from there.


class RecordRefused(ValueError):
    pass


# --- statistics -----------------------------------------------------------------------------


def _incomplete_beta_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)), -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return result


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _incomplete_beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _incomplete_beta_fraction(b, a, 1 - x) / b


def student_t_upper_tail(t: float, df: float) -> float:
    """P(T > t) for Student's t with df degrees of freedom."""
    half = 0.5 * regularized_incomplete_beta(df / 2, 0.5, df / (df + t * t))
    return half if t >= 0 else 1.0 - half


def welch_one_sided(new: list[float], best_mean: float, best_std: float, best_n: int, gain: float = REQUIRED_GAIN_NATS):
    """Welch's test of H1: mean(new) < best_mean - gain (losses in nats; lower is better).
    Returns (t, degrees of freedom, p)."""
    n = len(new)
    if n < 2:
        raise RecordRefused("the test needs at least 2 runs")
    if best_n < 2 and best_std > 0:
        raise RecordRefused("a best score with a standard deviation needs at least 2 seeds")
    var_new, var_best = statistics.variance(new) / n, best_std**2 / best_n
    se = math.sqrt(var_new + var_best)
    if se == 0:
        raise RecordRefused("no spread in either sample: the test is undefined")
    t = (best_mean - gain - statistics.mean(new)) / se
    df = (var_new + var_best) ** 2 / (var_new**2 / (n - 1) + (var_best**2 / (best_n - 1) if best_n > 1 else 0.0))
    return t, df, student_t_upper_tail(t, df)


# --- runs -------------------------------------------------------------------------------------


def load_run(folder: Path) -> dict:
    if not (folder / "submission.json").is_file():
        raise RecordRefused(f"{folder}: no submission.json (did the run finish?)")
    summary = json.loads((folder / "submission.json").read_text())
    logs = [p for p in (folder / f"{summary['run_id']}.txt", folder / "runs" / f"{summary['run_id']}.txt") if p.exists()]
    if not logs:
        raise RecordRefused(f"{folder}: no log {summary['run_id']}.txt (there or in runs/)")
    return dict(folder=folder, log=logs[0], **summary)


def eval_seconds(run: dict) -> float:
    """The evaluation time the limit is held on: the records' count, from the first scored token
    to the final score."""
    return run["eval_scored_seconds"]


def strict_eval_seconds(run: dict) -> float:
    """The strict count: artifact read and decode, compile warm-ups and every stage."""
    return run["eval_total_seconds"]


def run_limits(runs: list[dict]) -> dict:
    """The limits the runs were held to, from their submission.json: one set for all."""
    for r in runs:
        missing = [k for k in ("limits", "eval_total_seconds", "eval_scored_seconds", "code_sha256") if k not in r]
        if missing:
            raise RecordRefused(f"{r['folder']}: submission.json has no {', '.join(missing)} (written by an older train_gpt.py)")
    limits = {json.dumps(r["limits"], sort_keys=True) for r in runs}
    if len(limits) > 1:
        raise RecordRefused(f"the runs were held to different limits ({len(limits)} sets)")
    return runs[0]["limits"]


RECORD_HARDWARE = re.compile(r".*H100.* x8")  # the challenge's machine, as train_gpt.py's summary names it


def check_runs(runs: list[dict], code: bytes, not_a_record: bool = False):
    """Every refusal the challenge's rules imply, with the run it concerns: one run per folder
    and per seed, the record's hardware (unless not_a_record: an example), the limits and one
    counted code."""
    folders = [r["folder"].resolve() for r in runs]
    for i, folder in enumerate(folders):
        if folder in folders[:i]:
            raise RecordRefused(f"{runs[i]['folder']} is given twice: one run counts once")
    seeds = {}
    for r in runs:
        if r["seed"] in seeds:
            raise RecordRefused(f"{seeds[r['seed']]} and {r['folder']} both ran seed {r['seed']}: a record needs one run per seed")
        seeds[r["seed"]] = r["folder"]
    limits = run_limits(runs)
    for r in runs:
        if not not_a_record and not RECORD_HARDWARE.fullmatch(r.get("hardware", "")):
            raise RecordRefused(f"{r['folder']}: ran on {r.get('hardware', 'unknown hardware')!r}, not 8xH100; --not-a-record makes an example folder")
        if r["artifact_bytes"]["total"] >= limits["artifact_bytes"]:
            raise RecordRefused(f"{r['folder']}: artifact {r['artifact_bytes']['total']:,} bytes, not under {limits['artifact_bytes']:,}")
        if r["train_seconds"] > limits["train_seconds"]:
            raise RecordRefused(f"{r['folder']}: training took {r['train_seconds']:.1f}s, over {limits['train_seconds']:.0f}s")
        if eval_seconds(r) > limits["eval_seconds"]:
            raise RecordRefused(f"{r['folder']}: evaluation took {eval_seconds(r):.1f}s, over {limits['eval_seconds']:.0f}s")
    check_data(runs, not_a_record)
    hashes = {r["code_sha256"] for r in runs}
    if len(hashes) > 1:
        raise RecordRefused(f"the runs' counted code differs ({len(hashes)} versions)")
    if hashlib.sha256(code).hexdigest() not in hashes:
        raise RecordRefused("the file given as --code is not the code the runs counted")
    if any(r["artifact_bytes"]["code"] != len(code) for r in runs):
        raise RecordRefused("the runs counted a code size other than the --code file's")


CHALLENGE_VALIDATION_DOCUMENTS = 50_000  # FineWeb's first 50k documents, the challenge's fixed set


def check_data(runs: list[dict], not_a_record: bool):
    """The runs were scored on one validation set (the same fingerprint of the scored tokens), and
    a record's is the challenge's 50,000 documents; an example (not_a_record) may use other data."""
    missing = [r["folder"] for r in runs if "data" not in r]
    if missing and not not_a_record:
        raise RecordRefused(f"{missing[0]}: submission.json does not say which data the run used (written by an older train_gpt.py)")
    if missing:
        return
    prints = {r["data"]["validation_sha256"] for r in runs}
    if len(prints) > 1:
        raise RecordRefused(f"the runs were scored on different validation sets ({len(prints)} fingerprints: {', '.join(sorted(prints))})")
    for r in runs:
        if not not_a_record and r["data"]["validation_documents"] != CHALLENGE_VALIDATION_DOCUMENTS:
            raise RecordRefused(f"{r['folder']}: scored on {r['data']['validation_documents']:,} validation documents, not the challenge's {CHALLENGE_VALIDATION_DOCUMENTS:,}; --not-a-record makes an example folder")


def data_line(runs: list[dict]) -> str:
    if "data" not in runs[0]:
        return "Data: not recorded (runs of an older train_gpt.py)."
    d = runs[0]["data"]
    which = "the challenge's validation set" if d["validation_documents"] == CHALLENGE_VALIDATION_DOCUMENTS else f"not the challenge's {CHALLENGE_VALIDATION_DOCUMENTS:,}-document validation set"
    bytes_from = "the byte sidecars" if d["byte_sidecar"] else "the tokenizer"
    return (f"Data: {d['validation_documents']:,} validation documents ({which}), {d['validation_targets']:,} scored targets, "
            f"{d['validation_bytes']:,} bytes (from {bytes_from}), fingerprint {d['validation_sha256']}; "
            f"training on {d['train_shards']} shards, {d['train_tokens']:,} tokens.")


def limits_line(limits: dict) -> str:
    return f"Limits (from the runs): artifact under {limits['artifact_bytes']:,} bytes; training {limits['train_seconds']:.0f} s; evaluation {limits['eval_seconds']:.0f} s (first scored token to the final score)."


def readme(runs: list[dict], best: dict, t: float, df: float, p: float, not_a_record: bool = False) -> str:
    losses = [r["val_loss"] for r in runs]
    bpbs = [r["val_bpb"] for r in runs]
    stages = [k for k in runs[0]["val_bpb_stages"] if all(k in r["val_bpb_stages"] for r in runs)]  # in the order the runs scored them
    hardware = sorted({r.get("hardware", "unknown") for r in runs})
    title = "# Example submission (not a record: --not-a-record)" if not_a_record else "# Record submission"
    lines = [title, "", f"Hardware: {', '.join(hardware)} (from the runs' logs); torch {', '.join(sorted({str(r.get('torch', '?')) for r in runs}))}.", "", data_line(runs), "", limits_line(runs[0]["limits"]), "", "| seed | steps | " + " | ".join(f"{k} bpb" for k in stages) + " | val_loss (nats) | train s | eval s (first scored token to score) | eval s (strict: load, compile, every stage) | artifact bytes |", "|" + " --- |" * (len(stages) + 7)]
    for r in runs:
        cells = [str(r["seed"]), str(r["steps"])] + [f"{r['val_bpb_stages'][k]:.5f}" for k in stages]
        cells += [f"{r['val_loss']:.5f}", f"{r['train_seconds']:.1f}", f"{eval_seconds(r):.1f}", f"{strict_eval_seconds(r):.1f}", f"{r['artifact_bytes']['total']:,}"]
        lines.append("| " + " | ".join(cells) + " |")
    clears = p < SIGNIFICANCE and statistics.mean(losses) < best["mean"] - REQUIRED_GAIN_NATS
    lines += [
        "",
        f"val_bpb mean {statistics.mean(bpbs):.5f} (std {statistics.stdev(bpbs):.5f}; the final stage, {'/'.join(sorted({r['final_stage'] for r in runs}))}); val_loss mean {statistics.mean(losses):.5f} nats (std {statistics.stdev(losses):.5f}), {len(runs)} seeds.",
        f"Best entry: val_loss {best['mean']:.5f} nats (std {best['std']:.5f}, {best['n']} seed{'s' if best['n'] != 1 else ''}). Difference {statistics.mean(losses) - best['mean']:+.5f} nats; the bar is {-REQUIRED_GAIN_NATS:+.3f}.",
        f"One-sided Welch test of mean < best - {REQUIRED_GAIN_NATS}: t = {t:.3f}, {df:.1f} degrees of freedom, p = {p:.4g}.",
        "",
        f"**Verdict: {'clears' if clears else 'does not clear'} the bar** ({'at least' if clears else 'not shown to be'} {REQUIRED_GAIN_NATS} nats better at p < {SIGNIFICANCE})."
        + (" An example's verdict shows only how a record's is computed: its runs are not on the challenge's hardware or data." if not_a_record else ""),
        "",
        "Files: `train_gpt.py` (the counted code), `submission.json`, `requirements.txt`, the train logs.",
    ]
    return "\n".join(lines) + "\n"


def best_from_folder(folder: Path) -> dict:
    losses = [r["val_loss"] for r in json.loads((folder / "submission.json").read_text())["runs"]]
    return dict(mean=statistics.mean(losses), std=statistics.stdev(losses), n=len(losses))


def make_record(run_folders: list[Path], code_path: Path, out: Path, best: dict, requirements: Path, not_a_record: bool = False) -> str:
    if out.exists() and any(out.iterdir()):
        raise RecordRefused(f"{out} exists and is not empty")
    runs = [load_run(f) for f in run_folders]
    code = code_path.read_bytes()
    check_runs(runs, code, not_a_record)
    t, df, p = welch_one_sided([r["val_loss"] for r in runs], best["mean"], best["std"], best["n"])
    text = readme(runs, best, t, df, p, not_a_record)
    out.mkdir(parents=True, exist_ok=True)
    (out / "README.md").write_text(text)
    (out / "train_gpt.py").write_bytes(code)
    shutil.copy(requirements, out / "requirements.txt")
    for r in runs:
        shutil.copy(r["log"], out / f"train_seed{r['seed']}.txt")
    fields = ("run_id", "seed", "steps", "val_bpb", "val_loss", "val_bpb_stages", "final_stage", "train_seconds", "eval_scored_seconds", "eval_total_seconds", "stage_seconds", "artifact_bytes", "limits", "code_sha256", "hardware", "torch", "data")
    summary = dict(
        val_bpb=round(statistics.mean(r["val_bpb"] for r in runs), 6),
        val_loss=round(statistics.mean(r["val_loss"] for r in runs), 6),
        seeds=[r["seed"] for r in runs],
        welch=dict(t=round(t, 4), df=round(df, 2), p=float(f"{p:.4g}"), best=best, required_gain_nats=REQUIRED_GAIN_NATS),
        runs=[{k: r[k] for k in fields if k in r} for r in runs],
    )
    (out / "submission.json").write_text(json.dumps(summary, indent=2) + "\n")
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, nargs="+", required=True, help="run folders (submission.json + log)")
    ap.add_argument("--code", type=Path, help="the counted code file the runs wrote (default: the first run folder's train_gpt.packed.py)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--best-loss", type=float, help="the best entry's mean val_loss in nats")
    ap.add_argument("--best-std", type=float)
    ap.add_argument("--best-seeds", type=int)
    ap.add_argument("--best-folder", type=Path, help="instead: a record folder written by this tool")
    ap.add_argument("--requirements", type=Path, default=Path(__file__).with_name("requirements.txt"))
    ap.add_argument("--not-a-record", action="store_true", help="an example folder from runs not on 8xH100 (the README says so)")
    args = ap.parse_args()
    if args.best_folder:
        best = best_from_folder(args.best_folder)
    elif None not in (args.best_loss, args.best_std, args.best_seeds):
        best = dict(mean=args.best_loss, std=args.best_std, n=args.best_seeds)
    else:
        ap.error("give --best-loss, --best-std and --best-seeds, or --best-folder")
    try:
        print(make_record(args.runs, args.code or args.runs[0] / "train_gpt.packed.py", args.out, best, args.requirements, args.not_a_record))
    except RecordRefused as err:
        raise SystemExit(f"make_record.py: refused: {err}") from None


if __name__ == "__main__":
    main()
