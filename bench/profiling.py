"""The GPU's peak and where its time goes (bench_packing.py --profile, bench_pplx.py --profile): torch.profiler's CUDA
kernels summed by kind, and the time the GPU sat idle (wall time minus kernel time: one stream, so the
kernels barely overlap). User annotations on the GPU timeline (e.g. "Optimizer.step#AdamW.step") are not
kernels and are left out, or their kernels would count twice."""

from __future__ import annotations

import re
import time

import torch

KERNEL_KINDS = (  # (category, regex on the CUDA kernel name), first match wins
    ("attention", r"flash|fmha|attention|softmax_warp"),
    ("optimizer", r"adam|multi_tensor|foreach|_amp_|norm_kernel_cuda|lpnorm"),
    ("matmul", r"gemm|cutlass|nvjet|sm90_|sm80_|cublas|matmul|splitk"),
    ("loss", r"cross_entropy|log_softmax|nll_loss|logsoftmax"),
    ("copy", r"memcpy|memset|copy|cat_|CatArray|index|gather|scatter"),
    ("elementwise", r"."),
)


def gpu_profiler():
    """torch.profiler over the CPU and CUDA activities (enter it, run, exit it, then summarize_profile)."""
    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])


def summarize_profile(prof, wall: float, steps: int) -> dict:
    kinds = {k: 0.0 for k, _ in KERNEL_KINDS}
    kernels: dict[str, float] = {}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA or getattr(e, "is_user_annotation", False):
            continue  # GPU-side ranges such as "Optimizer.step#AdamW.step" span kernels counted on their own
        us = e.time_range.elapsed_us()
        kernels[e.name] = kernels.get(e.name, 0.0) + us
        kinds[next(k for k, rx in KERNEL_KINDS if re.search(rx, e.name, re.I))] += us
    busy = sum(kinds.values()) / 1e6
    return {"wall_ms": 1e3 * wall / steps, "busy_ms": 1e3 * busy / steps, "idle_ms": 1e3 * max(0.0, wall - busy) / steps,
            "kinds_ms": {k: v / 1e3 / steps for k, v in kinds.items()},
            "top": sorted(((v / 1e3 / steps, k[:90]) for k, v in kernels.items()), reverse=True)[:12]}


def print_profile(name: str, p: dict) -> None:
    print(f"profile of {name}: {p['wall_ms']:.1f} ms per step, GPU busy {p['busy_ms']:.1f} ms "
          f"({100 * p['busy_ms'] / p['wall_ms']:.0f}%), idle {p['idle_ms']:.1f} ms")
    for k, v in p["kinds_ms"].items():
        print(f"    {k:<12}{v:>9.1f} ms {100 * v / p['wall_ms']:>5.1f}%")
    print("    top kernels (ms per step):")
    for v, k in p["top"]:
        print(f"      {v:>8.2f}  {k}")


def bf16_peak(reps: int = 10) -> float | None:
    """FLOP/s of a bf16 8192 x 8192 matmul on this GPU (2 * 8192^3 FLOPs each), the MFU denominator of every
    benchmark; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        x @ x
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        x @ x
    torch.cuda.synchronize()
    return reps * 2 * 8192**3 / (time.perf_counter() - t)
