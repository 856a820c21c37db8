"""Times the tied-head softcapped cross-entropy, forward + backward, at the B1 micro-step shape
(48 x 2048 tokens, V = 8192): the plain path compiled by Inductor vs the fused Triton kernel,
and the kernel alone at several warp counts.

    python3 bench/fused_loss.py
"""

import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def main():
    n, c, v = 48 * 2048, 512, 8192
    hidden = torch.randn(n, c, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(v, c, device="cuda") * 0.05).requires_grad_()
    targets = torch.randint(0, v, (n,), device="cuda")
    floor_ms = 2 * n * v * 2 / 3.0e12 * 1e3  # logits read once + gradient written once, at ~3 TB/s
    print(f"logits {n} x {v} bf16; memory floor of one read + one write at 3 TB/s: {floor_ms:.2f} ms")
    for fused in (False, True):
        module = tg.SoftcapTokenLoss(30.0)
        if not fused:
            module.compile(dynamic=False, fullgraph=True)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = module(hidden, weight, targets, fused=fused)
            loss.backward()

        ms = triton.testing.do_bench(step, warmup=200, rep=1000, return_mode="median")
        print(f"{'fused' if fused else 'plain (compiled)'}: forward + backward incl. matmuls {ms:.2f} ms")
    logits = torch.randn(n, v, device="cuda", dtype=torch.bfloat16) * 10
    for warps in (4, 8, 16, 32):
        def kernel():
            losses = torch.empty(n, device="cuda")
            tg._softcap_cross_entropy_kernel[(n,)](logits, targets, losses, v, 30.0, 1.0 / n, BLOCK=v, WRITE_GRAD=True, num_warps=warps)

        ms = triton.testing.do_bench(kernel, warmup=100, rep=500, return_mode="median")
        print(f"kernel alone, num_warps={warps}: {ms:.3f} ms ({2 * n * v * 2 / ms / 1e6:,.0f} GB/s)")


if __name__ == "__main__":
    main()
