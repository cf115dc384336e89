"""prepare's worker processes: each writes whole units (data/units.py), one at a time, with a one-thread
tokenizer, so ``--workers W`` keeps W cores busy and memory stays one unit's per worker.

Workers start with ``spawn`` (RECIPES: a forked child of a process whose tokenizer thread pool is running
disables the tokenizer's parallelism, and fork copies whatever the parent imported); they import
data/prepare.py and what it needs, never torch (data/__init__.py imports lazily). Each reports bytes read
through a queue, which the parent turns into the task's progress bar."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import threading
from typing import Any

from tqdm import tqdm

_STATE: dict[str, Any] = {}


def _init(tok_json: str, progress: Any) -> None:
    os.environ["RAYON_NUM_THREADS"] = "1"  # read when the tokenizer's pool starts: one core per worker
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from electra_scale.data.prepare import encoder

    _STATE["enc"], _STATE["progress"] = encoder(tok_json), progress


def _work(job) -> dict:
    from electra_scale.data.prepare import prepare_unit

    return prepare_unit(job, _STATE["enc"], _STATE["progress"].put)


def run_units(jobs: list, tok_json: str, workers: int, progress: bool, desc: str) -> list[dict]:
    """Every job's result (prepare_unit), in job order; the first failure is raised as it was raised."""
    bar = tqdm(total=sum(j.unit.bytes for j in jobs), desc=desc, unit="B", unit_scale=True, disable=not progress)
    try:
        if workers == 1 or len(jobs) <= 1:
            from electra_scale.data.prepare import encoder, prepare_unit

            enc = encoder(tok_json)
            return [prepare_unit(job, enc, bar.update) for job in jobs]
        ctx = multiprocessing.get_context("spawn")
        reports = ctx.Queue()
        done = threading.Event()

        def drain() -> None:
            while not done.is_set():
                with contextlib.suppress(queue.Empty):
                    bar.update(reports.get(timeout=0.5))

        drainer = threading.Thread(target=drain, daemon=True)
        drainer.start()
        try:
            with ctx.Pool(min(workers, len(jobs)), _init, (tok_json, reports), maxtasksperchild=None) as pool:
                return list(pool.imap(_work, jobs, chunksize=1))
        finally:
            done.set()
            drainer.join()
            with contextlib.suppress(queue.Empty):  # what the workers reported last
                while True:
                    bar.update(reports.get_nowait())
    finally:
        bar.close()
