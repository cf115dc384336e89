"""The device side of the bench: synchronisation, memory figures and the peak that MFU is measured against."""

from __future__ import annotations

import contextlib
import gc
import time
from pathlib import Path


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        # Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM) to its current RSS.
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")


def peak_memory(device) -> int | None:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # never reset: an upper bound


def current_memory(device) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def free_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def dtype_of(precision: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def measure_matmul_tflops(device, precision: str, n: int = 1024, seconds: float = 1.0) -> float:
    """Dense n x n matmul throughput in TFLOP/s on this device, this precision and torch's current threads
    (best of several timed batches): the CPU's practical peak."""
    import torch

    if device.type == "cuda":
        n = max(n, 8192)  # big enough to saturate a datacenter GPU
    a = torch.randn(n, n, device=device, dtype=dtype_of(precision))
    b = torch.randn(n, n, device=device, dtype=dtype_of(precision))
    for _ in range(3):
        a @ b
    sync(device)
    best, deadline = 0.0, time.perf_counter() + seconds
    reps = 1
    while True:
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        elapsed = time.perf_counter() - start
        best = max(best, 2 * n**3 * reps / elapsed / 1e12)
        if time.perf_counter() > deadline:
            return best
        if elapsed < 0.05:
            reps *= 2


def device_peak(device, precision: str, configured: float | None) -> tuple[float, str, float]:
    """(peak TFLOP/s for MFU, where it came from, measured matmul TFLOP/s)."""
    import torch

    from electra_scale.engine.model import gpu_peak_tflops

    measured = measure_matmul_tflops(device, precision)
    if configured:
        return configured, "train.peak_tflops", measured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        table = gpu_peak_tflops(name)
        if table:
            return table, f"table: {name} dense bf16", measured
        return measured, f"measured {precision} matmul ({name} is not in model.GPU_PEAK_TFLOPS)", measured
    return measured, f"measured {precision} matmul, {torch.get_num_threads()} threads", measured
