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
    # Per test as it finished (scripts/gpu_pytest_log.py); a "started" line with no outcome after it: the test the
    # step's limit cut.
    for lines in sorted(out.glob("pytest-*.jsonl")):
        outcomes: dict[str, dict] = {}
        for line in lines.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record["outcome"] == "started":
                outcomes[record["test"]] = {"test": record["test"], "outcome": "cut", "seconds": 0.0}
            else:
                outcomes[record["test"]] = {"test": record["test"], "outcome": record["outcome"],
                                            "seconds": float(record.get("seconds", 0))}  # fmt: skip
        cases += outcomes.values()
    for xml in sorted(out.glob("pytest*.xml")):
        if xml.with_suffix(".jsonl").exists():
            continue
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
            keep = ("step_time_s", "tokens_per_s", "mfu", "peak_memory_bytes", "error", "steps", "cut", "diverged")
            rows[name] = {k: r.get(k) for k in keep}
            if r.get("data_wait") is not None:
                rows[name]["data_wait"] = r["data_wait"]
        if report.get("running") and report["running"] not in rows:  # killed in it: no result, not even a cut
            rows[report["running"]] = {"cut": True, "error": None}
        summary["bench"][path.stem.removeprefix("bench-")] = {
            "micro_batch_size": report["micro_batch_size"],
            "found": bool(report.get("found_micro_batch")),
            "seq_len": report["seq_len"],
            "peak_tflops": report["peak_tflops"],
            "paths": rows,
            "overhead": report.get("overhead"),
            "unpad": "train.unpad=true" in report.get("overrides", []),
            "compile": "train.compile=true" in report.get("overrides", []),
            "pad_frac": report.get("pad_frac"),
            "cut": report.get("cut") or report.get("running"),
        }
    # One row per lever setting, per shape (bench --ablate --rows-out): each a real pretrain run, all else equal,
    # naming every lever's setting; appended as each finished.
    # A row's "started" line with no row after it: the row the step's limit killed (cut).
    summary["ablation"] = []
    keep = ("lever", "value", "setting", "micro_batch_size", "unpad", "compile", "zero_stage", "precision",
            "step_time_s", "steps", "tokens_per_s", "examples_per_s", "mfu", "peak_memory_bytes", "data_wait",
            "pad_frac", "caveat", "first_window_s", "error", "cut", "diverged")  # fmt: skip
    for path in sorted(out.glob("ablation-*.jsonl")):
        rows: dict = {}
        for n, line in enumerate(path.read_text().splitlines()):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if row.get("status") == "started":
                row = {**row, "cut": True, "error": None}
            rows[row.get("index", f"line {n}")] = row
        for row in rows.values():
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
    ]
    lines += headline(s)
    lines += [
        "| step | status | seconds | limit | note |",
        "|---|---|---|---|---|",
    ]
    for st in s["steps"]:
        status = st["status"]
        if status == 124:
            status = "124 (cut at its limit)"
        elif status == 75:
            status = "75 (stopped by SIGTERM)"
        status = f"{status}, as the dry run means it" if st.get("expected") else status
        lines.append(
            f"| {st['step']} | {status} | {st.get('seconds', '')} | {st.get('limit', '')} | {st.get('note', '')} |"
        )
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
                    what = "diverged" if r.get("diverged") else "failed"
                    lines.append(f"| {name} | {b['micro_batch_size']} | {path} | {what}: {r['error'][:80]} | | | | |")
                    continue
                if r.get("cut") and not r.get("step_time_s"):
                    lines.append(f"| {name} | {b['micro_batch_size']} | {path} | cut: no timed steps | | | | |")
                    continue
                step = f"{r['step_time_s'] * 1e3:.1f} ms" if r.get("step_time_s") else "-"
                tps = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-"
                mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
                mem = f"{r['peak_memory_bytes'] / 2**30:.1f} GiB" if r.get("peak_memory_bytes") else "-"
                wait = f"{r['data_wait']:.1%}" if r.get("data_wait") is not None else ""
                micro = f"{b['micro_batch_size']}{' (largest)' if b['found'] else ''}"
                step += " (cut)" if r.get("cut") else ""
                lines.append(f"| {name} | {micro} | {path} | {step} | {tps} | {mfu} | {mem} | {wait} |")
        for name, b in s["bench"].items():
            names = {"engine_vs_bare": "engine / bare", "pretrain_vs_bare": "pretrain / bare"}
            names |= {"engine_vs_bare_cpu_time": "(CPU time)", "pretrain_vs_bare_cpu_time": "(CPU time)"}
            ratios = ", ".join(f"{names.get(k, k)} {v:.3f}" for k, v in (b.get("overhead") or {}).items())
            if ratios:
                lines.append(f"\n{name}: {ratios} (step time over the bare loop's, interleaved)")
            if b.get("cut"):
                lines.append(f"\n{name}: cut by SIGTERM during {b['cut']}: nothing after it ran")
    if s.get("ablation"):
        lines += [
            "",
            "## ablation: one lever at a time, the real pretrain path",
            "",
            "| shape | micro-batch | padding | setting | unpad | compile | ZeRO | step | real tokens/s | MFU "
            "| peak memory | data wait | warm-up window |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in s["ablation"]:
            pad = f"{r['pad_frac']:.0%}" if r.get("pad_frac") is not None else "-"
            setting = r.get("setting") or f"{r['lever'].removeprefix('train.')}={r['value']}"
            setting = setting.replace("ds_configs/", "")
            zero = f"{r.get('zero_stage')}" + (" (host sync)" if r.get("caveat") else "")
            where = (
                f"| {r['shape']} | {r['micro_batch_size']} | {pad} | {setting} "
                f"| {r.get('unpad')} | {r.get('compile')} | {zero} |"
            )
            if r.get("error"):
                lines.append(f"{where} {'diverged' if r.get('diverged') else 'failed'}: {r['error'][:80]} | | | | | |")
                continue
            if r.get("step_time_s") is None:  # cut before a timed window (or killed in it)
                lines.append(f"{where} cut: no timed steps | | | | | |")
                continue
            first = f"{r['first_window_s']:.1f} s" if r.get("first_window_s") is not None else "-"
            cut = f" (cut: {r.get('steps')} timed steps)" if r.get("cut") else ""
            lines.append(
                f"{where} {r['step_time_s'] * 1e3:.1f} ms{cut} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | "
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


def headline(s: dict) -> list[str]:
    """The figures the check exists for, first: Large's MFU with each lever (the ablation's rows) and the
    engine's overhead in pretrain with padding-free + compile (pretrain / bare)."""
    lines = []
    for r in (r for r in s.get("ablation", []) if r["shape"] == "large"):
        setting = r.get("setting") or f"{r['lever']}={r['value']}"
        if r.get("unpad") is not None:  # what the row ran, whichever lever it changed
            setting = "padding-free" if r["unpad"] else "padded"
            setting += f", compiled ({r['compile']})" if r.get("compile") not in (None, "off") else ", eager"
        if r.get("mfu") is not None:
            figure = f"MFU {r['mfu']:.1%}" + (" (cut)" if r.get("cut") else "")
        else:
            figure = "diverged" if r.get("diverged") else "failed" if r.get("error") else "cut, no figure"
        lines.append(f"- Large, {setting}, micro-batch {r['micro_batch_size']}: {figure}")
    b = s.get("bench", {}).get("large-unpad-compile")
    if b:
        pre, bare = b["paths"].get("pretrain") or {}, b["paths"].get("bare") or {}
        ratio = (b.get("overhead") or {}).get("pretrain_vs_bare")
        mfu = lambda r: f"{r['mfu']:.1%}" if r.get("mfu") else "-"  # noqa: E731
        lines.append(
            f"- Large, padding-free + compile, micro-batch {b['micro_batch_size']}: pretrain MFU {mfu(pre)}, bare loop "
            f"{mfu(bare)}; pretrain / bare {f'{ratio:.3f}' if ratio else '-'} (goals: MFU >= 40%, ratio <= 1.10)"
        )
    return ["## Headline", "", *lines, ""] if lines else []


def main() -> int:
    out = Path(sys.argv[1])
    s = collect(out)
    (out / "summary.json").write_text(json.dumps(s, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(s))
    # "expected": the dry run's deliberate failures (a killed build, a cut row), shown but no failure of the run.
    failed = [st["step"] for st in s["steps"] if st["status"] not in (0, "not run") and not st.get("expected")]
    print(markdown(s))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
