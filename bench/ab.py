"""Paired fixed-step A/B runs of train_gpt.py (B4): every variant over the same seeds and steps
as the baseline, then per-seed and mean differences of every val_bpb stage, and tokens/s.

    python3 bench/ab.py --out /tmp/ab --seeds 1,2 \
        --common "ITERATIONS=100 MAX_WALLCLOCK_SECONDS=100000 TTT_ENABLED=0" \
        --variant base= --variant polar=MUON_NS_COEFFICIENTS=polar_express [--gpus 0,1]

The first variant is the baseline A; every other one is a B compared against it. Runs go in
the order seed 1 (all variants), seed 2 (all variants), ... so that a cut-short call still
leaves complete pairs; with --gpus, one run per GPU at a time. Each run works in
OUT/<variant>_s<seed>/ (log, submission.json, artifact); the table is printed and written to
OUT/summary.txt ("gap": quantized - EMA, for changes to the quantization alone). --report
only re-reads OUT. A fixed-step run needs ITERATIONS and a
MAX_WALLCLOCK_SECONDS far past what the steps take (the schedule then follows the steps).

--eval-only compares evaluation settings on the same weights: per seed the baseline trains (and
evaluates), then every other variant evaluates the baseline's artifact (EVAL_ONLY=1), one after
another on the same GPU: no training noise between A and B, and one training per seed.
"""

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_env(text: str) -> dict:
    return dict(item.split("=", 1) for item in text.split())


def run_one(out: Path, name: str, env: dict, seed: int, gpu: str | None, cpu_threads: int) -> str:
    run_dir = out / f"{name}_s{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    # Runs side by side share the CPU: each gets its share of the cores for torch's CPU work
    # (model init, artifact decoding). Unbounded, k runs x all cores of spinning OpenMP threads
    # made one CPU stage 10-20x slower (load_artifact 83 s instead of 4 s with 3 runs at once).
    full = {"OMP_NUM_THREADS": str(cpu_threads), **os.environ, **env, "SEED": str(seed), "RUN_ID": f"{name}_s{seed}", "OUT_DIR": str(out)}  # the run's outputs land in run_dir
    if gpu is not None:
        full["CUDA_VISIBLE_DEVICES"] = gpu
    t0 = time.time()
    with open(run_dir / "stdout.txt", "w") as f:
        proc = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], cwd=run_dir, env=full, stdout=f, stderr=subprocess.STDOUT)
    return f"{name}_s{seed}: exit {proc.returncode} in {time.time() - t0:.0f}s"


def plan(out: Path, variants: dict, seeds: list[int], common: dict, eval_only: bool) -> list[list[tuple[str, dict, int]]]:
    """The runs as chains of (name, env, seed), each chain run in order on one GPU: one run per
    chain, or with eval_only one chain per seed, the baseline's training run first and the other
    variants evaluating its artifact after it."""
    base = next(iter(variants))
    chains = []
    for seed in seeds:
        runs = [(name, {**common, **env}, seed) for name, env in variants.items()]
        if not eval_only:
            chains.extend([run] for run in runs)
            continue
        artifact = {"EVAL_ONLY": "1", "ARTIFACT_PATH": str(out / f"{base}_s{seed}" / "final_model.pgq")}
        chains.append([runs[0]] + [(name, {**env, **artifact}, seed) for name, env, seed in runs[1:]])
    return chains


def run_all(out: Path, variants: dict, seeds: list[int], common: dict, gpus: list[str | None], eval_only: bool = False):
    jobs = queue.Queue()
    for chain in plan(out, variants, seeds, common, eval_only):
        jobs.put(chain)

    def worker(gpu):
        while True:
            try:
                chain = jobs.get_nowait()
            except queue.Empty:
                return
            for name, env, seed in chain:
                print(run_one(out, name, env, seed, gpu, max(1, (os.cpu_count() or 1) // len(gpus))), flush=True)

    threads = [threading.Thread(target=worker, args=(g,)) for g in gpus]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def stage(result: dict, key: str) -> float | None:
    """A val_bpb stage of a run, or "gap": quantized - EMA, what the quantization alone costs;
    its B - A is free of the training noise that the other stages carry."""
    stages = result["val_bpb_stages"]
    if key == "gap":
        return stages["quantized"] - stages["ema"] if "quantized" in stages and "ema" in stages else None
    return stages.get(key)


def load(out: Path, name: str, seed: int) -> dict | None:
    path = out / f"{name}_s{seed}" / "submission.json"
    return json.loads(path.read_text()) if path.exists() else None


def report(out: Path, variants: list[str], seeds: list[int]) -> str:
    base = variants[0]
    results = {(name, s): load(out, name, s) for name in variants for s in seeds}
    lines = [f"A/B, baseline {base!r}; B - A in val_bpb (negative: B better); seeds {seeds}"]
    for name in variants:
        for s in seeds:
            r = results[name, s]
            if r is None:
                lines.append(f"  {name} seed {s}: no result")
            else:
                stages = " ".join(f"{k} {v:.5f}" for k, v in r["val_bpb_stages"].items())  # in the order the run scored them
                tps = r.get("train_tokens_per_second", {})
                trained = f"steps {r['steps']} " if "steps" in r else "evaluation only, "  # an EVAL_ONLY run has no training figures
                lines.append(f"  {name} seed {s}: {trained}{stages} | tok/s {tps.get('before_looping', 0):,} / {tps.get('looping', 0):,} | bytes {r['artifact_bytes']['total']:,}")
    order = list(dict.fromkeys(k for r in results.values() if r for k in r["val_bpb_stages"]))  # the runs' own stages, in their order
    for name in variants[1:]:
        lines.append(f"{name} - {base}:")
        for k in (*order, "gap"):
            diffs = []
            for s in seeds:
                a, b = results[base, s], results[name, s]
                if a and b and stage(a, k) is not None and stage(b, k) is not None:
                    diffs.append(stage(b, k) - stage(a, k))
            if diffs:
                per_seed = ", ".join(f"{d:+.5f}" for d in diffs)
                lines.append(f"  {k:9s} mean {statistics.mean(diffs):+.5f}  per seed [{per_seed}]")
        for phase in ("before_looping", "looping"):
            ratios = []
            for s in seeds:
                a, b = results[base, s], results[name, s]
                if a and b and phase in a.get("train_tokens_per_second", {}) and phase in b.get("train_tokens_per_second", {}):
                    ratios.append(b["train_tokens_per_second"][phase] / a["train_tokens_per_second"][phase] - 1)
            if ratios:
                lines.append(f"  tok/s {phase:14s} {100 * statistics.mean(ratios):+.1f}%")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--common", default="", help="settings of every run, 'KEY=VALUE ...'")
    ap.add_argument("--variant", action="append", required=True, help="NAME='KEY=VALUE ...' (the first is the baseline)")
    ap.add_argument("--gpus", default="", help="comma-separated GPU ids, one run per GPU at a time")
    ap.add_argument("--eval-only", action="store_true", help="the variants evaluate the baseline's artifact of each seed (EVAL_ONLY)")
    ap.add_argument("--report", action="store_true", help="only print the table of the runs in OUT")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if len(seeds) < 2:  # e.g. a second call that adds a seed; the report then reads both
        print("note: B4 needs at least 2 seeds per comparison; report them together with --report --seeds", flush=True)
    variants = {}
    for v in args.variant:
        name, _, env = v.partition("=")
        variants[name] = parse_env(env)
    if not args.report:
        common = parse_env(args.common)
        if "ITERATIONS" not in common:
            ap.error("--common must set ITERATIONS (B4 runs a fixed number of steps)")
        run_all(args.out.resolve(), variants, seeds, common, args.gpus.split(",") if args.gpus else [None], args.eval_only)
    table = report(args.out, list(variants), seeds)
    print(table)
    (args.out / "summary.txt").write_text(table + "\n")


if __name__ == "__main__":
    main()
