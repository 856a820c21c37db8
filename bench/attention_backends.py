"""Times causal GQA attention (forward + backward) at the training shape for every backend
train_gpt.py can use, and prints the fastest as BEST=<name>. With a training shard, also
FlexAttention with DOC_MASK's document mask on the shard's first B windows (its real document
boundaries), against the same kernel with no boundary inside the windows. With --uses, FA3
against cuDNN at the shape of every use of the kernel (the table ATTENTION_BY_USE follows).

    python3 bench/attention_backends.py            # B=48, T=2048, 8 query / 4 KV heads, D=64
    python3 bench/attention_backends.py data/datasets/fineweb10B_sp8192/fineweb_train_000000.bin
    python3 bench/attention_backends.py --uses
"""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


# Per use of the kernel in train_gpt.py: (batch rows, window length, backward?) per rank.
USES = {
    "train": (48, 2048, True),  # a training micro-step (8 per step on one GPU)
    "lora_ttt": (64, 2048, True),  # LoRA TTT: a batch of document rows; the adapters need the backward
    "lora_ttt_2560": (64, 2560, True),  # the same rows with the accepted records' 2560-token window
    "sliding": (32, 2048, False),  # the sliding-window and plain evaluations: forward only
}


def time_backend(backend, B=48, T=2048, H=8, Hkv=4, D=64, iters=20, ids=None, backward=True):
    """ids [B, T] (backend "flex" only): the windows whose document mask is timed. backward=False
    times the forward alone, under no_grad."""
    if backend == "fa3" and tg.flash_attn_3 is None:
        return None
    if backend != "flex":
        tg.use_sdpa_backend(tg.choose_kernels(tg.Hyperparameters(attention_backend=backend), torch.device("cuda")))
    q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, T, Hkv, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, T, Hkv, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    mask = None if ids is None else tg.document_attention_mask(ids.cuda(), "flex")
    fn = torch.compile(lambda q, k, v, mask: tg.causal_attention(q, k, v, backend, mask), fullgraph=True)
    dense = None if ids is None else tg.document_attention_mask(ids.cuda(), "dense")
    reference = tg.causal_attention(q.float(), k.float(), v.float(), "math", dense)
    out = fn(q, k, v, mask)
    err = ((out.float() - reference).norm() / reference.norm()).item()
    grad = torch.randn_like(out)

    def once():
        if backward:
            fn(q, k, v, mask).backward(grad)
        else:
            with torch.no_grad():
                fn(q, k, v, mask)

    for _ in range(3):
        once()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        once()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / iters
    flops = (3.5 if backward else 1.0) * 2 * 2 * B * H * T * T * D / 2  # fwd (2 matmuls, causal half) + bwd (2.5x)
    return ms, err, flops / ms / 1e9


def compare_uses():
    """FA3 against cuDNN at every use's shape; the faster per use is what ATTENTION_BY_USE in
    train_gpt.py should say."""
    for use, (B, T, backward) in USES.items():
        times = {}
        for backend in ("fa3", "cudnn"):
            r = time_backend(backend, B=B, T=T, backward=backward)
            if r is not None:
                times[backend] = r[0]
                print(f"{use:9s} B={B:3d} T={T} {'fwd+bwd' if backward else 'fwd    '} {backend:6s} {r[0]:7.2f} ms  rel.err {r[1]:.1e}  {r[2]:6.1f} TFLOP/s")
        if times:
            print(f"{use:9s} FASTEST={min(times, key=times.get)}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--uses"]:
        compare_uses()
        sys.exit(0)
    results = {}
    for backend in ("fa3", "cudnn", "flash", "efficient"):
        try:
            r = time_backend(backend)
        except Exception as e:  # a backend the build or GPU lacks
            print(f"{backend:10s} unavailable: {type(e).__name__}: {str(e)[:200]}")
            continue
        if r is None:
            print(f"{backend:10s} not installed")
            continue
        ms, err, tflops = r
        results[backend] = ms
        print(f"{backend:10s} {ms:7.2f} ms fwd+bwd  rel.err {err:.1e}  {tflops:6.1f} TFLOP/s")
    print(f"BEST={min(results, key=results.get)}")
    if len(sys.argv) > 1:  # DOC_MASK's FlexAttention on real document boundaries
        ids = torch.from_numpy(np.asarray(tg.read_shard(Path(sys.argv[1]))[: 48 * 2048]).astype(np.int64)).view(48, 2048)
        one_document = torch.full_like(ids, 2)
        for label, windows in (("flex, no boundary", one_document), (f"flex, {int((ids == tg.BOS_ID).sum())} BOS in the windows", ids)):
            ms, err, _ = time_backend("flex", ids=windows)
            print(f"{label:30s} {ms:7.2f} ms fwd+bwd  rel.err {err:.1e}")
