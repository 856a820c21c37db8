"""Profiles full training steps at the B1 shape (one GPU, 8 micro-steps of 48 x 2048) and
prints the CUDA time per kernel category, the top kernels and the measured tokens/s.

    DATA_DIR=... [SPEEDUPS=0] python3 bench/profile_step.py [regional|full] [looping] [autotune] [coord]
    python3 bench/profile_step.py lora        # LoRA TTT's step (random weights and tokens; no data)

regional: train_gpt.py's per-block compile; full: torch.compile of the whole hidden_states (every
block unrolled in one graph, so Inductor fuses across block boundaries; the loss as in train_gpt.py).
autotune: blocks compiled with mode="max-autotune-no-cudagraphs" (Triton GEMM templates with
fused epilogues); coord: Inductor's coordinate-descent tuning of its kernels. SPEEDUPS=0 profiles
train_gpt.py's plain path. lora: one pass of LoRA TTT's compiled step as the evaluation runs it
(LORA_TTT_BATCH_DOCS documents of three chunks each: two scored chunks with an AdamW step, one
without), on random weights and tokens, as warm_up_lora_ttt times it for the time plan.
"""

import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

CATEGORIES = [  # first match wins
    ("attention", ("cudnn", "flash", "fmha", "attention", "sdpa")),
    ("matmul", ("gemm", "sm90_xmma", "cutlass", "nvjet", "ampere", "hopper", "wgmma", "cublas")),
    ("optimizer", ("adam", "foreach", "multi_tensor")),
    ("nccl", ("nccl",)),
    ("triton (fused elementwise/reductions)", ("triton",)),
    ("eager elementwise/copies", ("copy", "cast", "fill", "memset", "memcpy", "elementwise_kernel")),
]


def categorize(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def report(prof, label: str, wall: float, unit: str = "step"):
    """CUDA time per kernel category, the GPU's idle gaps and the top kernels of what was profiled
    (one training step, or `unit`)."""
    by_cat, by_name = defaultdict(float), defaultdict(lambda: [0.0, 0])
    for e in prof.key_averages():
        t = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        if t <= 0 or e.key.startswith("ProfilerStep"):
            continue
        by_cat[categorize(e.key)] += t
        by_name[e.key][0] += t
        by_name[e.key][1] += e.count
    total = sum(by_cat.values())
    print(f"{label} CUDA time per {unit} {total / 1000:.0f} ms (wall {wall * 1000:.0f} ms)")
    for cat, t in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        print(f"  {cat:40s} {t / 1000:8.1f} ms  {100 * t / total:5.1f}%")
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda e: e.time_range.start)
    gaps = [(b.time_range.start - a.time_range.end, a.name, b.name) for a, b in zip(kernels, kernels[1:])]
    idle = sum(g for g, _, _ in gaps if g > 0)
    print(f"  GPU idle between kernels: {idle / 1000:.1f} ms in {sum(g > 5 for g, _, _ in gaps)} gaps > 5 us; largest:")
    for g, a, b in sorted(gaps, key=lambda t: -t[0])[:12]:
        print(f"    {g / 1000:7.2f} ms  after {a[:60]}  before {b[:60]}")
    print("  top kernels:")
    for name, (t, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:40]:
        print(f"    {t / 1000:8.2f} ms  x{n:<5d} {name[:110]}")


def profile_lora_ttt():
    h = tg.Hyperparameters.from_env()
    rt = tg.init_runtime()
    h.validate(1)
    model = tg.build_model(h, rt, tg.Logger(None))
    t0 = time.perf_counter()
    step = tg.warm_up_lora_ttt(model, h, rt.device)  # compiles, then times a pass: half of it is the plan's step
    print(f"[lora_ttt] compile + 2 passes: {time.perf_counter() - t0:.1f}s; step {step * 1000:.0f} ms at {h.lora_ttt_batch_docs} x {h.lora_ttt_window()} (chunks of {h.lora_ttt_chunk_tokens})")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        tg.warm_up_lora_ttt(model, h, rt.device)  # two more passes: the table below is per pass of two steps
    report(prof, "[lora_ttt]", 4 * step, unit="2 passes (4 AdamW steps, 6 scored chunks)")


def main():
    if not torch.cuda.is_available():
        raise SystemExit("profile_step.py profiles CUDA kernels: run it on a GPU machine")
    mode = sys.argv[1] if len(sys.argv) > 1 else "regional"
    if mode == "lora":
        return profile_lora_ttt()
    looping = "looping" in sys.argv[2:]
    opts = set(sys.argv[2:])
    if "coord" in opts:
        import torch._inductor.config as inductor_config
        inductor_config.coordinate_descent_tuning = True
        mode += "+coord"
    h = tg.Hyperparameters.from_env()
    mode += "" if h.speedups else "+plain"
    rt = tg.Runtime(0, 1, 0, torch.device("cuda"))
    torch.cuda.set_device(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    h.validate(1)
    kernels = tg.choose_kernels(h, rt.device)
    tg.use_sdpa_backend(kernels)
    model = tg.GPT(h.model_config(), kernels, looping).cuda()
    if mode.startswith("regional") and "autotune" in opts:
        torch._dynamo.config.cache_size_limit = 64
        for block in model.blocks:
            block.compile(dynamic=False, fullgraph=True, mode="max-autotune-no-cudagraphs")
        if not kernels.fused_loss:  # as compile_model: the fused loss is not compiled
            model.token_loss.compile(dynamic=False, fullgraph=True, mode="max-autotune-no-cudagraphs")
        mode += "+autotune"
    elif mode.startswith("regional"):
        tg.compile_model(model)
    else:  # the training loss calls hidden_states: compiling forward would leave the training step eager
        torch._dynamo.config.cache_size_limit = 64
        model.hidden_states = torch.compile(model.hidden_states, dynamic=False, fullgraph=True)
        if not kernels.fused_loss:
            model.token_loss.compile(dynamic=False, fullgraph=True)
    settings = tg.StepSettings(1.0, 0.95, 1.0, looping, h.train_seq_len)  # a mid-training step's, warm-up aside
    opt = tg.Optimizers(model, h, rt)
    files = tg.find_shards(h, "train")
    loader = tg.TrainLoader(files, h.train_seq_len, 48, 0, 1, h.seed, h.vocab_size, rt.device)
    t0 = time.perf_counter()
    for _ in range(2):
        tg.train_step(model, opt, loader, h, rt, 8, settings)
    torch.cuda.synchronize()
    print(f"[{mode} looping={looping}] compile + 2 steps: {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    for _ in range(3):
        tg.train_step(model, opt, loader, h, rt, 8, settings)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / 3
    layers = len(model.layer_order())
    tok_s = h.train_batch_tokens / dt
    print(f"[{mode} looping={looping}] step {dt * 1000:.0f} ms, {tok_s:,.0f} tok/s, MFU {100 * tok_s * tg.flops_per_token(h, layers) / 989e12:.1f}%")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        tg.train_step(model, opt, loader, h, rt, 8, settings)
        torch.cuda.synchronize()
    report(prof, f"[{mode} looping={looping}]", dt)


if __name__ == "__main__":
    main()
