"""prepare's cost per MB of text against the bare tokenizer's, and its throughput with 1 and 2 workers (issue 27).

    python scripts/prepare_bench.py --text wiki.txt --tokenizer tokenizer.json --repeat 4

Each measurement is a process of its own; its CPU time comes from RUSAGE_CHILDREN (so a prepare's worker
processes count), minus that of a process that only starts (the tokenizer loaded; the CLI with --help;
reported apart). The tokenizer runs on one thread everywhere (RAYON_NUM_THREADS=1): ``--workers W`` is W
single-threaded processes. CPU-s per MB is robust on a shared machine; the MB/s and the scaling ratio need a
quiet one.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BARE = """
import sys
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
batch = []
with open(sys.argv[2], encoding="utf-8") as f:
    for line in f:
        batch.append(line)
        if len(batch) == 1000:
            tok.encode_batch(batch, add_special_tokens=False)
            batch = []
tok.encode_batch(batch, add_special_tokens=False)
"""
BARE_FAST = BARE.replace("encode_batch(", "encode_batch_fast(")  # the call prepare makes: no offsets


def _run(cmd: list[str], env: dict) -> tuple[float, float]:
    """(CPU seconds of the process and its children, wall seconds)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", required=True, help="a .txt corpus (documents separated by blank lines)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: train:8192 on the text, --tokenizer-only)")
    p.add_argument("--repeat", type=int, default=1, help="concatenate the text this many times")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--units", type=int, default=8, help="work units the text is cut into (--chunk-bytes)")
    p.add_argument("--rounds", type=int, default=3, help="measurements of each kind; medians are printed")
    args = p.parse_args()

    env = {**os.environ, "RAYON_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cli = [sys.executable, "-m", "electra_scale", "prepare"]
    with tempfile.TemporaryDirectory(prefix="prepare-bench-") as tmp:
        text = Path(tmp, "corpus.txt")
        data = Path(args.text).read_bytes().rstrip(b"\n") + b"\n\n"
        text.write_bytes(data * args.repeat)
        mb = text.stat().st_size / 1e6
        tokenizer = args.tokenizer
        if tokenizer is None:
            vocab = Path(tmp, "vocab")
            subprocess.run([*cli, "--input", args.text, "--output", str(vocab), "--tokenizer", "train:8192",
                            "--tokenizer-only"], env=env, check=True, stdout=subprocess.DEVNULL)  # fmt: skip
            tokenizer = str(vocab / "tokenizer.json")

        bare_import, _ = _run([sys.executable, "-c", "from tokenizers import Tokenizer; import sys; "
                               "Tokenizer.from_file(sys.argv[1])", tokenizer], env)  # fmt: skip
        prep_import, _ = _run([*cli, "--help"], env)  # the CLI's start: its imports and parser
        chunk = str(-(-text.stat().st_size // args.units))
        rounds: list[dict] = []
        for _ in range(args.rounds):  # interleaved, so that a busy spell of the machine hits all alike
            r = {"bare": _run([sys.executable, "-c", BARE, tokenizer, str(text)], env)}
            r["fast"] = _run([sys.executable, "-c", BARE_FAST, tokenizer, str(text)], env)
            for workers in (1, 2):
                out = Path(tmp, f"out{workers}")
                cmd = [*cli, "--input", str(text), "--output", str(out), "--tokenizer", tokenizer]
                cmd += ["--seq-len", str(args.seq_len), "--workers", str(workers), "--chunk-bytes", chunk]
                r[workers] = _run(cmd, env)
                shutil.rmtree(out)
            rounds.append(r)

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    bare_mb = median([(r["bare"][0] - bare_import) / mb for r in rounds])
    prep_mb = median([(r[1][0] - prep_import) / mb for r in rounds])
    print(f"text: {mb:.1f} MB ({args.text} x {args.repeat}), seq {args.seq_len}, {args.units} units, one tokenizer "
          f"thread; medians of {args.rounds} rounds")  # fmt: skip
    print(f"imports alone (subtracted): tokenizer {bare_import:.2f} CPU-s, prepare {prep_import:.2f} CPU-s")
    fast_mb = median([(r["fast"][0] - bare_import) / mb for r in rounds])
    print(f"bare tokenizer (encode_batch of 1,000 lines):  {bare_mb:.3f} CPU-s/MB")
    print(f"  the same with encode_batch_fast (prepare's): {fast_mb:.3f} CPU-s/MB")
    ratios = [(r[1][0] - prep_import) / (r["bare"][0] - bare_import) for r in rounds]
    print(f"prepare --workers 1:                            {prep_mb:.3f} CPU-s/MB   ratio {median(ratios):.2f}")
    print("  ratio per round: " + ", ".join(f"{x:.2f}" for x in ratios))
    fast = [(r[1][0] - prep_import) / (r["fast"][0] - bare_import) for r in rounds]
    print(f"  against encode_batch_fast: {median(fast):.2f}")
    for w in (1, 2):
        cpu, wall = median([r[w][0] for r in rounds]), median([r[w][1] for r in rounds])
        print(f"prepare --workers {w}: {wall:7.1f} s wall, {mb / wall:6.2f} MB/s, {cpu:7.1f} CPU-s ({cpu / mb:.3f}/MB)")
    speedup = median([r[1][1] / r[2][1] for r in rounds])
    print(f"throughput 2 workers / 1 worker: {speedup:.2f}x")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    print(f"largest resident set of any one process (the runs above, workers included): {peak:.0f} MiB")


if __name__ == "__main__":
    main()
