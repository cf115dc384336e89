"""The bench's report: a table (rich when installed) with the lines around it."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field


@dataclass
class PathResult:
    name: str
    step_time_s: float | None = None
    tokens_per_s: float | None = None
    tflops: float | None = None
    mfu: float | None = None
    peak_memory_bytes: int | None = None
    steps: int = 0
    error: str | None = None
    extra: dict = field(default_factory=dict)


def as_dict(r: PathResult) -> dict:
    d = {k: v for k, v in r.__dict__.items() if k not in ("name", "extra")}
    return {**d, **r.extra}


def _fmt(value, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    return "-" if value is None else f"{value * scale:{spec}}{suffix}"


def table_rows(report: dict) -> list[list[str]]:
    rows = []
    labels = {
        "bare": "bare PyTorch loop",
        "engine": "DeepSpeed engine, fixed batch",
        "pretrain": "electra-scale pretrain",
    }
    for name, label in labels.items():
        r = report["results"].get(name)
        if r is None:
            continue
        if r.get("error"):
            rows.append([label, "failed: " + r["error"][:60], "", "", "", "", ""])
            continue
        ratio = report["overhead"].get(f"{name}_vs_bare", 1.0 if name == "bare" else None)
        rows.append(
            [
                label,
                _fmt(r["step_time_s"], ".1f", 1e3, " ms"),
                _fmt(r["tokens_per_s"], ",.0f"),
                _fmt(r["tflops"], ".3f"),
                _fmt(r["mfu"], ".1%"),
                _fmt(r["peak_memory_bytes"], ",.0f", 2**-20, " MiB"),
                _fmt(ratio, ".3f", suffix="x"),
            ]
        )
    return rows


HEADER = ["path", "step time", "tokens/s", "TFLOP/s", "MFU", "peak memory", "vs bare"]


def report_lines(report: dict) -> tuple[list[str], list[str]]:
    """(lines before the table, lines after it)."""
    r = report
    head = [
        f"config        {' + '.join(r['config'])} {' '.join(r['overrides'])}".rstrip(),
        f"device        {r['device']}, {r['threads']} threads, {r['precision']}, ZeRO-{r['zero_stage']}, 1 rank",
        f"batch         micro-batch {r['micro_batch_size']}"
        + (" (the largest that fits)" if r.get("found_micro_batch") else "")
        + f" x seq {r['seq_len']} x accumulation {r['grad_accum']}"
        f" = {r['tokens_per_step']:,} tokens per step; {r['warmup']} warm-up + {r['steps']} timed steps",
        f"FLOPs/token   {r['flops_per_token']:.4g} for MFU (the paper's convention: {r['paper_flops_per_token']:.4g})",
        f"peak          {r['peak_tflops']:.4g} TFLOP/s ({r['peak_source']})",
    ]
    tail = [
        "vs bare: step time over that of bare steps interleaved with the path's; peak memory: what the path adds "
        + ("to the process's peak RSS" if r["device"].startswith("CPU") else "to CUDA max allocated")
    ]
    o = r["overhead"]
    for name, label in (("pretrain", "framework overhead (pretrain / bare)"), ("engine", "DeepSpeed engine / bare")):
        if f"{name}_vs_bare" in o:
            cpu = o.get(f"{name}_vs_bare_cpu_time")
            tail.append(
                f"{label}: {o[f'{name}_vs_bare']:.3f}x in wall time"
                + (f", {cpu:.3f}x in CPU time (steadier on a busy CPU)" if cpu else "")
            )
    pre = r["results"].get("pretrain") or {}
    if pre.get("data_wait") is not None:
        tail.append(f"pretrain waited for data {pre['data_wait']:.1%} of its step time (data_wait, median window)")
    for name, result in r["results"].items():
        if result.get("error"):
            tail.append(f"{name} path failed: {result['error']}")
    if r.get("cut"):
        tail.append(f"cut by SIGTERM during {r['cut']}: its figures are partial or missing; nothing after it ran")
    data = r["results"].get("data")
    if data and not data.get("error"):
        headroom = r.get("data_headroom")
        tail.append(
            f"data path, 1 core, rank 0 of {data['world_size']} ({data['partitions']} partitions; {data['source']}): "
            f"{data['samples_per_s']:,.0f} samples/s = {data['tokens_per_s']:,.0f} tokens/s per CPU-second "
            f"({data['wall_samples_per_s']:,.0f} samples/s wall; {data['samples']:,} samples, "
            f"{data['cpu_s_per_sample'] * 1e6:.2f} us CPU each, median of {data['repeats']} passes: "
            f"{data['cpu_s_per_sample_range'][0] * 1e6:.2f}-{data['cpu_s_per_sample_range'][1] * 1e6:.2f})"
            + (f"; {headroom:.1f}x what training consumes" if headroom else "")
        )
        tail.append(
            f"data fetched by that rank: {data['bytes_fetched']:,} bytes in {data['gets']:,} GETs from "
            f"{data['objects_read']} of {data['shards']} shards = {data['bytes_share']:.3f}x its 1/W share of the "
            f"epoch's {data['bytes_total']:,} bytes (+ {data['manifest_bytes']:,} bytes of manifest)"
        )
    for row in r.get("ablation", []):
        pairs = zip(row["lever"].split("+"), str(row["value"]).split("+"))
        setting = f"ablation {' '.join(f'{key}={value}' for key, value in pairs)}:"
        if row.get("error"):
            tail.append(f"{setting} {'diverged' if row.get('diverged') else 'failed'}: {row['error']}")
            continue
        if row.get("step_time_s") is None:
            tail.append(f"{setting} cut by SIGTERM before its first timed window: no figures")
            continue
        tail.append(
            f"{setting} {'(cut by SIGTERM, fewer timed steps) ' if row.get('cut') else ''}"
            f"{row['step_time_s'] * 1e3:.1f} ms per step, {row['examples_per_s']:,.1f} examples/s, "
            f"{row['tokens_per_s']:,.0f} real tokens/s ({row['pad_frac']:.1%} padding), MFU {row['mfu']:.1%}, "
            f"peak memory +{row['peak_memory_bytes'] / 2**20:,.0f} MiB"
            + (f", {row['cpu_time_s'] * 1e3:.1f} ms CPU" if row.get("cpu_time_s") else "")
        )
    for row in r.get("data_sweep", []):
        tail.append(
            f"  W={row['world_size']:>4}: {row['bytes_fetched']:>13,} bytes ({row['bytes_share']:.3f}x of 1/W), "
            f"{row['gets']:>6,} GETs, {row['objects_read']:>4} shards read, "
            f"{row['cpu_s_per_sample'] * 1e6:6.2f} us CPU per trained sample "
            f"({row['cpu_s_per_sample_range'][0] * 1e6:.2f}-{row['cpu_s_per_sample_range'][1] * 1e6:.2f}), "
            f"{row['samples']:,} samples"
        )
    return head, tail


def print_report(report: dict, out=None) -> None:
    """A rich table when rich is installed, plain aligned text otherwise."""
    out = out or sys.stdout
    head, tail = report_lines(report)
    rows = table_rows(report)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(row[i]) for row in [HEADER, *rows]) for i in range(len(HEADER))]
        table = [
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            for row in [HEADER, *rows]
        ]
        print("\n".join([*head, *table, *tail]), file=out)
        return
    console = Console(file=out, width=max(120, Console(file=out).width))
    for line in head:
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    table = Table(*HEADER)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for line in tail:
        console.print(line, highlight=False, markup=False, soft_wrap=True)
