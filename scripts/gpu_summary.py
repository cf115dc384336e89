"""summary.json and summary.md from what scripts/gpu_check.sh left in its output directory.

python scripts/gpu_summary.py OUT_DIR

The check runs it after every step: whatever is there (a step cut at its limit leaves its log and the rows it
streamed) makes a summary.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def collect(out: Path) -> dict:
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line.strip()]
    summary: dict = {"env": _json(out / "env.json"), "steps": steps}
    cases = []
    for xml in sorted(out.glob("pytest*.xml")):
        try:
            suite = ET.parse(xml).getroot()
        except ET.ParseError:
            continue
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        for case in suite.iter("testcase"):
            outcome = "passed"
            for tag in ("failure", "error", "skipped"):
                if case.find(tag) is not None:
                    outcome = tag
            cases.append({"test": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0))})
    if cases:
        summary["pytest"] = cases
    summary["bench"] = {}
    for path in sorted(out.glob("bench-*.json")):
        report = _json(path)
        if not report:
            continue
        rows = {}
        for name, r in report["results"].items():
            if name == "data":
                continue
            rows[name] = {k: r.get(k) for k in ("step_time_s", "tokens_per_s", "mfu", "peak_memory_bytes", "error")}
            if r.get("data_wait") is not None:
                rows[name]["data_wait"] = r["data_wait"]
        summary["bench"][path.stem.removeprefix("bench-")] = {
            "micro_batch_size": report["micro_batch_size"],
            "found": bool(report.get("found_micro_batch")),
            "seq_len": report["seq_len"],
            "peak_tflops": report["peak_tflops"],
            "paths": rows,
            "overhead": report.get("overhead"),
        }
    # One row per lever setting, per shape (bench --ablate --rows-out): each a real pretrain run, all else equal,
    # naming every lever's setting; appended as each finished.
    summary["ablation"] = []
    for path in sorted(out.glob("ablation-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            keep = ("lever", "value", "micro_batch_size", "unpad", "compile", "zero_stage", "precision", "step_time_s",
                    "tokens_per_s", "examples_per_s", "mfu", "peak_memory_bytes", "data_wait", "pad_frac", "caveat",
                    "first_window_s", "error")  # fmt: skip
            summary["ablation"].append({"shape": path.stem.removeprefix("ablation-"), **{k: row.get(k) for k in keep}})
    metrics = out / "pretrain-metrics.jsonl"
    if metrics.exists():
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        summary["pretrain"] = {
            "steps": [r["step"] for r in records],
            "loss": [round(r["loss"], 4) for r in records],
            "tokens_per_s": [round(r["tokens_per_s"]) for r in records],
            "data_wait": [round(r.get("data_wait", 0), 4) for r in records],
            "resumed": "at step 50" in (out / "pretrain-resume.log").read_text(errors="replace")
            if (out / "pretrain-resume.log").exists()
            else False,
        }
    summary["profile"] = {p.stem.removeprefix("profile-"): _json(p) for p in sorted(out.glob("profile-*.json"))}
    cost = out / "objective_cost.log"
    if cost.exists():
        summary["objective_cost"] = [line for line in cost.read_text().splitlines() if line.strip()][-4:]
    return summary


def markdown(s: dict) -> str:
    env = s.get("env") or {}
    lines = [
        "# GPU check" + (" (dry run on CPU)" if env.get("dry_run") else ""),
        "",
        f"{env.get('gpu') or 'CPU'}; torch {env.get('torch')}, CUDA {env.get('cuda')}, "
        f"DeepSpeed {env.get('deepspeed')}, transformers {env.get('transformers')}",
        "",
        "| step | status | seconds | limit |",
        "|---|---|---|---|",
    ]
    for st in s["steps"]:
        lines.append(f"| {st['step']} | {st['status']} | {st.get('seconds', '')} | {st.get('limit', '')} |")
    if s.get("pytest"):
        lines += ["", "## pytest -m gpu", ""]
        lines += [f"- {c['outcome']}: {c['test']} ({c['seconds']:.1f} s)" for c in s["pytest"]]
    if s["bench"]:
        lines += [
            "",
            "## bench (one GPU)",
            "",
            "| shape, ZeRO | micro-batch | path | step | tokens/s | MFU | peak memory | data wait |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, b in s["bench"].items():
            for path, r in b["paths"].items():
                if r.get("error"):
                    lines.append(f"| {name} | {b['micro_batch_size']} | {path} | failed: {r['error'][:80]} | | | | |")
                    continue
                step = f"{r['step_time_s'] * 1e3:.1f} ms" if r.get("step_time_s") else "-"
                tps = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-"
                mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
                mem = f"{r['peak_memory_bytes'] / 2**30:.1f} GiB" if r.get("peak_memory_bytes") else "-"
                wait = f"{r['data_wait']:.1%}" if r.get("data_wait") is not None else ""
                micro = f"{b['micro_batch_size']}{' (largest)' if b['found'] else ''}"
                lines.append(f"| {name} | {micro} | {path} | {step} | {tps} | {mfu} | {mem} | {wait} |")
    if s.get("ablation"):
        lines += [
            "",
            "## ablation: one lever at a time, the real pretrain path",
            "",
            "| shape | micro-batch | padding | lever = value | unpad | compile | ZeRO | step | real tokens/s | MFU "
            "| peak memory | data wait | warm-up window |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in s["ablation"]:
            pad = f"{r['pad_frac']:.0%}" if r.get("pad_frac") is not None else "-"
            value = str(r["value"]).removeprefix("ds_configs/")
            zero = f"{r.get('zero_stage')}" + (" (host sync)" if r.get("caveat") else "")
            where = (
                f"| {r['shape']} | {r['micro_batch_size']} | {pad} | {r['lever'].removeprefix('train.')} = {value} "
                f"| {r.get('unpad')} | {r.get('compile')} | {zero} |"
            )
            if r.get("error"):
                lines.append(f"{where} failed: {r['error'][:80]} | | | | | |")
                continue
            first = f"{r['first_window_s']:.1f} s" if r.get("first_window_s") is not None else "-"
            lines.append(
                f"{where} {r['step_time_s'] * 1e3:.1f} ms | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | "
                f"{r['peak_memory_bytes'] / 2**30:.2f} GiB | {r['data_wait'] or 0:.1%} | {first} |"
            )
        if any(r.get("caveat") for r in s["ablation"]):
            lines += ["", "(host sync): DeepSpeed's BF16/FP16_Optimizer tests the gradient norm on the host every step "
                      "at ZeRO-0/1 in bf16 (docs/gpu.md); the row measures that sync with the stage."]  # fmt: skip
    if s.get("pretrain"):
        p = s["pretrain"]
        lines += ["", "## 100-step pretrain of Small, stopped at 50 and resumed", ""]
        lines += [f"resumed: {p['resumed']}; steps logged: {p['steps']}", f"loss: {p['loss']}"]
        lines += [f"tokens/s: {p['tokens_per_s']}", f"data_wait: {p['data_wait']}"]
    for name, prof in (s.get("profile") or {}).items():
        if not prof:
            continue
        padding = "padding-free" if prof.get("unpad") else "padded"
        lines += ["", f"## one {padding} step of {name} (micro-batch {prof['micro_batch']} x {prof['seq_len']})", ""]
        lines.append(
            f"{prof['kernel_ops']} ops that launch work; host syncs {prof['host_syncs']} {prof['syncs_by_op']}"
        )
        if "kernel_launches" in prof:
            lines.append(
                f"{prof['kernel_launches']} kernel launches, {prof['cuda_time_ms']} ms of kernels, runtime syncs "
                f"{prof['runtime_syncs']}"
            )
            lines += [f"- {ms} ms {op}" for op, ms in prof["top_cuda_ops_ms"].items()]
    if s.get("objective_cost"):
        lines += ["", "## ELECTRA / MLM cost per token", "", "```", *s["objective_cost"], "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    out = Path(sys.argv[1])
    s = collect(out)
    (out / "summary.json").write_text(json.dumps(s, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(s))
    failed = [st["step"] for st in s["steps"] if st["status"] not in (0, "not run")]
    print(markdown(s))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
