"""Quantization study on saved final weights (CHECKPOINT_PATH of a train_gpt.py run): for each
variant, plain val_bpb of the dequantized model, its gap to the unquantized model, and the
artifact's weight bytes. Isolates what the gap comes from without retraining.

    DATA_DIR=... python3 bench/quant_sweep.py /path/to/checkpoint.pt
"""

import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

VARIANTS = [  # name, hyperparameter overrides, calibration sequences, what stays unquantized
    ("record: GPTQ int6 k12.85, embed int8 k20", {}, 64, None),
    ("calibration 256 sequences", {}, 256, None),
    ("calibration 256, damp 0.001", {"gptq_damp": 0.001}, 256, None),
    ("only matrices quantized (embed fp)", {}, 64, "embed"),
    ("only embed quantized (matrices fp)", {}, 64, "matrices"),
    ("matrices k 11.5", {"matrix_clip_k": 11.5}, 64, None),
    ("matrices k 14", {"matrix_clip_k": 14.0}, 64, None),
    ("embed k 16", {"embed_clip_k": 16.0}, 64, None),
    ("embed int7 k 12", {"embed_bits": 7, "embed_clip_k": 12.0}, 64, None),
    ("round-to-nearest (no GPTQ)", {"gptq_damp": 1e6}, 64, None),  # huge damping: H ~ identity
]


def main():
    h = tg.Hyperparameters.from_env()
    rt = tg.Runtime(0, 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt = torch.load(sys.argv[1], map_location=rt.device)
    log = tg.Logger(None)
    model = tg.build_model(h, rt, log)
    model.load_state_dict(ckpt["state_dict"])
    model.looping = ckpt["looping"]
    sp = tg.load_tokenizer(tg.tokenizer_path(h), h.vocab_size)
    tables = tg.build_byte_tables(sp)
    val = tg.load_validation_tokens(tg.find_shards(h, "val"), h.eval_seq_len, h.vocab_size)
    files = tg.find_shards(h, "train")
    base = tg.evaluate(model, val, tables, h.eval_seq_len, None, h.eval_batch_seqs, rt)
    print(f"unquantized: val_bpb {base.bpb:.5f}")
    hessians = {n: tg.collect_hessians(model, tg.TrainLoader(files, h.train_seq_len, h.train_batch_tokens // (8 * h.train_seq_len), 0, 1, h.seed + 1, h.vocab_size, rt.device), n, rt) for n in (64, 256)}
    evaluator = tg.build_model(h, rt, log)
    evaluator.looping = model.looping
    original = model.state_dict()
    print(f"{'variant':45s} {'val_bpb':>9s} {'gap':>8s} {'weights bytes':>14s} {'seconds':>8s}")
    for name, overrides, calib, keep in VARIANTS:
        hv = dataclasses.replace(h, **overrides)
        t0 = time.perf_counter()
        q = tg.quantize_model(model, hessians[calib], hv, rt)
        size = len(tg.pack_artifact(q, hv, model.looping))
        seconds = time.perf_counter() - t0
        state = {k: (v.dequantize() if isinstance(v, tg.QuantizedTensor) else v.float()) for k, v in q.items()}
        if keep == "embed":
            state["tok_emb.weight"] = original["tok_emb.weight"]
        elif keep == "matrices":
            state.update({k: original[k] for k in tg.quantized_matrices(model) if k != "tok_emb.weight"})
        evaluator.load_state_dict(state)
        r = tg.evaluate(evaluator, val, tables, h.eval_seq_len, None, h.eval_batch_seqs, rt)
        print(f"{name:45s} {r.bpb:9.5f} {r.bpb - base.bpb:+8.5f} {size:14,d} {seconds:8.1f}")


if __name__ == "__main__":
    main()
