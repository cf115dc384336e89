"""Framework overhead of `electra-scale pretrain` against a bare PyTorch loop: now part of `electra-scale bench`.

    .venv/bin/python scripts/bench_overhead.py [--config configs/small.yaml] [--steps 20] [--micro-batch 8]

Runs the bench on the shape this script always measured (1 rank, seq 128, micro-batch 8, fp32, torch AdamW),
without the data-path measurement; see docs/bench.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/small.yaml")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args()
    from electra_scale.cli import main as cli

    return cli(
        [
            "bench",
            "--config",
            args.config,
            f"train.micro_batch_size={args.micro_batch}",
            "train.precision=fp32",
            "optim.bias_correction=true",
            "data.num_workers=1",
            *args.overrides,
            "--steps",
            str(args.steps),
            "--skip",
            "data",
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
