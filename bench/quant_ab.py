"""Quantization A/B on the same weights: the saved final weights of a train_gpt.py run
(CHECKPOINT_PATH, the EMA weights that the run quantized) go through the run's own calibration,
step allocation, GPTQ, LQER and size fit once per variant, and each artifact is loaded back and
scored like the run's quantized stage. No training noise between the variants, so one checkpoint
per seed decides a quantization setting.

    DATA_DIR=... python3 bench/quant_ab.py runs/x/final.pt base= calib16=GPTQ_CALIB_SEQS=16 \
        lqer64=LQER_GROUP=64

A variant is NAME=KEY=VALUE,KEY=VALUE (empty: the environment's settings). The table gives each
variant's quantized val_bpb, its difference from the first, the artifact's bytes and seconds.
The models run uncompiled (the same path for every variant; figures are comparable among the
variants of one call, not with a compiled run's).
"""

import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def parse_variant(text: str, h: tg.Hyperparameters, tool: str = "quant_ab.py", allowed: set[str] | None = None) -> tuple[str, tg.Hyperparameters]:
    """NAME=KEY=VALUE,KEY=VALUE (a value may hold commas: LORA_TTT_TARGETS=q,v,o) as the variant's
    name and h with its settings; an unknown name, or one outside `allowed` (upper case) where
    given, ends the tool with one line."""
    name, _, settings = text.partition("=")
    if not name:
        raise SystemExit(f"{tool}: {text!r}: a variant is NAME=KEY=VALUE,... (NAME= for the environment's settings)")
    env, key = {}, None
    for item in filter(None, settings.split(",")):
        if "=" in item:
            key, value = item.split("=", 1)
            env[key] = value
        elif key is not None:  # a comma inside a value
            env[key] += "," + item
        else:
            raise SystemExit(f"{tool}: {name}: {item!r} is not KEY=VALUE")
    fields = {f.name.upper(): f for f in dataclasses.fields(h)}
    unknown = set(env) - set(fields)
    if unknown:
        raise SystemExit(f"{tool}: {name}: not hyperparameters: {', '.join(sorted(unknown))}")
    fixed = sorted(set(env) - allowed) if allowed is not None else []
    if fixed:
        raise SystemExit(f"{tool}: {name}: {', '.join(fixed)} not an evaluation setting (the weights are the artifact's)")
    return name, dataclasses.replace(h, **{fields[k].name: tg._parse_value(k, v, fields[k].type) for k, v in env.items()})


def main():
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    h = dataclasses.replace(tg.Hyperparameters.from_env(), compile=False)
    variants = [parse_variant(v, h) for v in sys.argv[2:]]
    rt = tg.Runtime(0, 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    log = tg.Logger(None)
    ckpt = torch.load(sys.argv[1], map_location=rt.device)
    model = tg.build_model(h, rt, log, ckpt["looping"])
    model.load_state_dict(ckpt["state_dict"])
    sp = tg.load_tokenizer(tg.tokenizer_path(h), h.vocab_size)
    val_files = tg.find_shards(h, "val")
    val = tg.load_validation_tokens(val_files, h.eval_seq_len, h.vocab_size)
    target_bytes = tg.validation_target_bytes(val, tg.build_byte_tables(sp), tg.load_validation_byte_sidecars(val_files, len(val)))
    train_files = tg.find_shards(h, "train")
    code = len(tg.counted_code(h, log, None))

    def score(m) -> float:
        return tg.evaluate(m, val, target_bytes, tg.Windows(h.eval_seq_len, None, h.eval_batch_seqs), rt).bpb

    unquantized = score(model)
    print(f"unquantized (the checkpoint): val_bpb {unquantized:.5f}; code {code:,} bytes", flush=True)
    print(f"{'variant':12s} {'val_bpb':>9s} {'vs first':>9s} {'gap':>9s} {'bytes':>11s} {'seconds':>8s}", flush=True)
    first = None
    for name, hv in variants:
        t0 = time.perf_counter()
        local_seqs = hv.train_batch_tokens // (hv.accum_steps(1) * hv.train_seq_len)

        def make_loader(seed_offset):  # as train_gpt.run: 1 for the Hessians, 2 for the step allocation
            return tg.TrainLoader(train_files, hv.train_seq_len, local_seqs, 0, 1, hv.seed + seed_offset, hv.vocab_size, rt.device)

        hessians = tg.collect_hessians(model, make_loader(1), hv.gptq_calib_seqs, rt)
        multipliers = tg.allocate_quantization_steps(model, hessians, make_loader(2), hv, rt, log) if hv.quant_alloc_seqs else None
        blob = tg.build_artifact(model, hessians, multipliers, code, hv, rt, log, tg.StageTimer(log, rt.device))
        seconds = time.perf_counter() - t0
        state, looping = tg.unpack_artifact(blob, hv)
        evaluator = tg.build_model(hv, rt, log, looping)
        evaluator.load_state_dict(state)
        bpb = score(evaluator)
        first = bpb if first is None else first
        print(f"{name:12s} {bpb:9.5f} {bpb - first:+9.5f} {bpb - unquantized:+9.5f} {len(blob) + code:11,d} {seconds:8.1f}", flush=True)


if __name__ == "__main__":
    main()
