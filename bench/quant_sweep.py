"""Quantization study on saved final weights (CHECKPOINT_PATH of a train_gpt.py run): for each
variant, plain val_bpb of the dequantized model, its gap to the unquantized model, and the
artifact's weight bytes. Isolates what the gap comes from without retraining.

Part two quantizes one group of matrices at a time (the rest stay full precision) and reports
each group's share of the gap on validation and, next to it, the same measurement on a stretch
of training data: if the two agree, the allocation of bits across groups can be calibrated on
training data inside the training budget.

    DATA_DIR=... python3 bench/quant_sweep.py /path/to/checkpoint.pt
"""

import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

VARIANTS = [  # name, hyperparameter overrides, calibration sequences, allocate steps by measured damage
    ("record: GPTQ int6 k12.85, embed int8 k20", {}, 64, False),
    ("allocated steps (ratio 2, 64 seqs)", {}, 64, True),
    ("allocated steps (ratio 3, 64 seqs)", {"quant_alloc_max_ratio": 3.0}, 64, True),
    ("allocated steps (ratio 2, 256 seqs)", {"quant_alloc_seqs": 256}, 64, True),
    ("allocated, calibration 256", {}, 256, True),
    ("round-to-nearest (no GPTQ)", {"gptq_damp": 1e6}, 64, False),  # huge damping: H ~ identity
]


def groups(model):
    out = tg.quantization_groups(model)
    for kind in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"):
        out[kind] = [f"blocks.{i}.{kind}.weight" for i in range(len(model.blocks))]
    return out


def main():
    h = tg.Hyperparameters.from_env()
    rt = tg.Runtime(0, 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt = torch.load(sys.argv[1], map_location=rt.device)
    log = tg.Logger(None)
    model = tg.build_model(h, rt, log, ckpt["looping"])
    model.load_state_dict(ckpt["state_dict"])
    sp = tg.load_tokenizer(tg.tokenizer_path(h), h.vocab_size)
    tables = tg.build_byte_tables(sp)
    val = tg.load_validation_tokens(tg.find_shards(h, "val"), h.eval_seq_len, h.vocab_size)
    files = tg.find_shards(h, "train")
    shard = tg.read_shard(files[-1])
    train_stretch = torch.from_numpy(shard[-(len(val)) :].astype("int64"))  # same size as val

    def bpb(m, tokens):
        return tg.evaluate(m, tokens, tg.validation_target_bytes(tokens, tables), tg.Windows(h.eval_seq_len, None, h.eval_batch_seqs), rt).bpb

    base, base_train = bpb(model, val), bpb(model, train_stretch)
    print(f"unquantized: val_bpb {base:.5f}, train-stretch bpb {base_train:.5f}")

    def make_loader(seed_offset):  # as train_gpt.main: 1 for the Hessians, 2 for the step allocation
        return tg.TrainLoader(files, h.train_seq_len, h.train_batch_tokens // (8 * h.train_seq_len), 0, 1, h.seed + seed_offset, h.vocab_size, rt.device)

    hessians = {n: tg.collect_hessians(model, make_loader(1), n, rt) for n in (64, 256)}
    evaluator = tg.build_model(h, rt, log, model.looping)
    original = model.state_dict()

    def dequantized(q):
        return {k: (v.dequantize() if isinstance(v, tg.QuantizedTensor) else v.float()) for k, v in q.items()}

    print(f"{'variant':45s} {'val_bpb':>9s} {'gap':>8s} {'weights bytes':>14s} {'seconds':>8s}")
    for name, overrides, calib, allocate in VARIANTS:
        hv = dataclasses.replace(h, **overrides)
        t0 = time.perf_counter()
        multipliers = tg.allocate_quantization_steps(model, hessians[calib], make_loader(2), hv, rt, print) if allocate else None
        q = tg.quantize_model(model, hessians[calib], hv, rt, multipliers)
        size = len(tg.pack_artifact(q, hv, model.looping))
        seconds = time.perf_counter() - t0
        evaluator.load_state_dict(dequantized(q))
        r = bpb(evaluator, val)
        print(f"{name:45s} {r:9.5f} {r - base:+8.5f} {size:14,d} {seconds:8.1f}", flush=True)

    state = dequantized(tg.quantize_model(model, hessians[256], h, rt))
    print(f"\n{'only this group quantized':20s} {'params':>10s} {'val gap':>9s} {'train gap':>9s} {'val gap / Mparam':>16s}")
    for group, names in groups(model).items():
        mixed = dict(original)
        mixed.update({n: state[n] for n in names})
        evaluator.load_state_dict(mixed)
        params = sum(original[n].numel() for n in names)
        gap, train_gap = bpb(evaluator, val) - base, bpb(evaluator, train_stretch) - base_train
        print(f"{group:20s} {params:10,d} {gap:+9.5f} {train_gap:+9.5f} {gap / params * 1e6:16.6f}", flush=True)


if __name__ == "__main__":
    main()
