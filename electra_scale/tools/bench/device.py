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


# ELECTRA-Large, seq 512, bf16, ZeRO-2, padded batches: the engine added 73.8 GiB at micro-batch 128 on an H200,
# with the bare loop's weights and AdamW state resident beside it (docs/bench.md, 2026-11-29). Nothing larger was
# tried, and a search upward costs a Large build per trial: the GPU check scales from this instead.
LARGE_MEASURED = (128, 73.8 * 2**30)


def micro_batch_for(total_bytes: int, measured=LARGE_MEASURED, resident: float = 8 * 2**30, share=0.9) -> int:
    """The largest power of two, at most the measured micro-batch, whose memory (the measured bytes scaled by
    examples: activations dominate, and the weights' share makes the estimate cautious) fits in ``share`` of the
    device's ``total_bytes`` beside ``resident`` bytes. An H200 (141 GB) keeps 128; an 80 GB H100 gets 64."""
    micro, used = measured
    budget = total_bytes * share - resident
    while micro > 1 and micro * used / measured[0] > budget:
        micro //= 2
    return micro


def large_micro_batches(total_bytes: int, pad_frac: float = 0.78) -> tuple[int, int, int]:
    """The GPU check's Large micro-batches on a device with ``total_bytes``: (the padded bench's; the ablation's,
    at most 64 so that its padded row fits beside nothing else and the rows compare across GPUs; the padding-free
    row at about the padded row's positions in real tokens: 4x at 78% padding, 64 -> 256)."""
    padded = micro_batch_for(total_bytes)
    rows = min(64, padded)
    factor = 1
    while factor * 2 * (1 - pad_frac) <= 1:
        factor *= 2
    return padded, rows, rows * factor
