"""Times the MLP, proj(leaky_relu(fc(x), 0.5)^2), forward + backward at the B1 micro-step shape
(48 x 2048 tokens, 512 -> 2048 -> 512, bf16): the plain path compiled by Inductor (cuBLAS
matmuls, the activation's derivative a separate kernel) vs train_gpt's `_FusedMLP` (the
derivative in the epilogue of a Triton matmul), compiled the same way; then that kernel alone at
several tile shapes against the matmul and kernel it replaces; --profile: the CUDA time per
kernel of each path.

    python3 bench/fused_mlp.py [--sweep] [--profile]
"""

import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

M, D, HIDDEN = 48 * 2048, 512, 2048


def plain_mlp(x, w_fc, w_proj):
    return F.linear(F.leaky_relu(F.linear(x, w_fc), 0.5).square(), w_proj)


def fused_mlp(x, w_fc, w_proj):
    return tg._FusedMLP.apply(x, w_fc, w_proj)


def bench(fn, warmup=50, rep=300) -> float:
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def whole_mlp(x, w_fc, w_proj, grad):
    times = {}
    for name, fn in (("plain (compiled)", plain_mlp), ("fused", fused_mlp)):
        compiled = torch.compile(fn, dynamic=False, fullgraph=True)

        def step():
            out = compiled(x, w_fc, w_proj)
            out.backward(grad)

        times[name] = bench(step)
        with torch.no_grad():
            times[name + ", forward only"] = bench(lambda: compiled(x, w_fc, w_proj))
    for name, ms in times.items():
        print(f"MLP {name}: {ms:.3f} ms")


def profile(x, w_fc, w_proj, grad):
    """CUDA time per kernel of one forward + backward of each path (after warm-up)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for name, fn in (("plain (compiled)", plain_mlp), ("fused", fused_mlp)):
        compiled = torch.compile(fn, dynamic=False, fullgraph=True)
        for _ in range(3):
            compiled(x, w_fc, w_proj).backward(grad)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                compiled(x, w_fc, w_proj).backward(grad)
            torch.cuda.synchronize()
        print(f"--- {name}, per forward + backward:")
        events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
        for e in events[:12]:
            print(f"  {e.device_time_total / 5 / 1e3:7.3f} ms  x{e.count // 5:<3} {e.key[:100]}")


def kernels_alone(x, w_fc, w_proj, grad, tiles):
    """The backward kernel against what it replaces: cuBLAS's grad_out W_proj and Inductor's
    derivative kernel."""
    pre = F.linear(x, w_fc)
    flops = 2 * M * D * HIDDEN
    derivative = torch.compile(lambda g, p: g * torch.where(p > 0, 2 * p, 0.5 * p))
    print(f"cuBLAS grad_out W_proj: {bench(lambda: grad @ w_proj):.3f} ms ({flops / 1e9:.0f} GFLOP); + derivative kernel: {bench(lambda: derivative(grad @ w_proj, pre)):.3f} ms")
    default = dict(tg.MLP_KERNEL_TILE)
    for tile in tiles:
        tg.MLP_KERNEL_TILE.clear()
        tg.MLP_KERNEL_TILE.update(tile)
        try:
            ms = bench(lambda: tg.mlp_hidden_grad(grad, w_proj, pre))
        except Exception as e:  # out of shared memory and the like
            print(f"{tile}: failed ({type(e).__name__}: {str(e)[:60]})")
            continue
        print(f"{tile}: {ms:.3f} ms ({flops / ms / 1e9:.0f} TFLOP/s)")
    tg.MLP_KERNEL_TILE.clear()
    tg.MLP_KERNEL_TILE.update(default)


def main():
    torch.manual_seed(0)
    x = torch.randn(M, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w_fc = (torch.randn(HIDDEN, D, device="cuda", dtype=torch.bfloat16) * D**-0.5).requires_grad_()
    w_proj = (torch.randn(D, HIDDEN, device="cuda", dtype=torch.bfloat16) * HIDDEN**-0.5).requires_grad_()
    grad = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)
    ref = plain_mlp(x, w_fc, w_proj)
    got = fused_mlp(x, w_fc, w_proj)
    print(f"triton {triton.__version__}")
    print(f"fused vs plain output, relative error {((got.float() - ref.float()).norm() / ref.float().norm()).item():.2e}")
    whole_mlp(x, w_fc, w_proj, grad)
    if "--profile" in sys.argv:
        profile(x, w_fc, w_proj, grad)
    tiles = [dict(tg.MLP_KERNEL_TILE)]
    if "--sweep" in sys.argv:
        for (bm, bn, bk, stages), warps in itertools.product([(128, 128, 64, 3), (128, 128, 64, 4), (128, 128, 64, 5), (128, 128, 128, 2), (128, 256, 64, 2), (64, 256, 64, 4)], [4, 8]):
            tile = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages)
            if tile not in tiles:
                tiles.append(tile)
    kernels_alone(x.detach(), w_fc.detach(), w_proj.detach(), grad, tiles)


if __name__ == "__main__":
    main()
