"""What a checkpoint save costs training (issue 35, item 2): the stall of a save, from its call to the next step,
and how much slower training steps are while its upload runs in the background (the node's uploader process,
engine/uploader.py), with a state of ELECTRA-Large's size.

    .venv/bin/python scripts/save_stall.py [--config configs/large.yaml] [--probe-steps 30] [--out DIR]

One process (W = 1) holds, saves and uploads the whole Large state (configs/large.yaml: 0.35 B parameters, fp32
here: module 1.4 GB + Adam's fp32 state 4.3 GB): the most any rank does. In a real job at W = 64 rank 0 uploads
the module and 1/64 of the optimizer state, the other ranks 1/64 each, so this is an upper bound per process.

1. The real engine (step.build_engine: DeepSpeed ZeRO-2, fp32 on CPU) takes one step on one 128-token sequence,
   so that Adam's state exists, then saves through engine/checkpoint.py's Checkpointer to a SeaweedFS started
   here, as pretrain does: the stall is ``Checkpointer.save``'s wall time (the local write, then every rank's
   barrier); hashing and the multipart upload then run in the node's uploader process.
2. While they run, the main thread runs probe steps; the same probes run before the save and after the upload
   (the baseline, both sides, so a drift of the machine shows). Two probes:
   - ``host``: what a GPU step asks of the host thread, which needs the GIL: launching kernels. Here: 2,000
     small tensor ops (dispatch, no real compute), then a sleep for the "device's" time, 3x the launch time
     measured idle (a GPU-bound step: the host runs ahead, then waits on the device, releasing the GIL). Its
     step time only grows if the launches fall behind the device's time.
   - ``launch``: the same 2,000 ops without the sleep: a host-bound step, the worst case.
   On this 2-core machine the upload's hashing, its HTTP threads and SeaweedFS itself also compete for the
   cores that the probe runs on, which a GPU node (16+ cores a GPU) does not: the figures are upper bounds.
   (The SeaweedFS server runs at niceness 19, standing for a remote store; the uploader at +10, as
   engine/uploader.py runs it, or, with --no-nice, at the training's.)
3. Then the question the figures of 2 cannot answer alone: is a slowdown the GIL (a thread of the training
   process) or the cores (any process)? The same work, hashing and uploading the checkpoint's module file,
   runs in turns in a thread of this process (how engine/checkpoint.py uploaded before the per-node
   uploader), in a child process (started and imported beforehand), and not at all, with the probes running
   meanwhile; A/B/C in alternation.
Prints tables; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from electra_scale.config import load_config  # noqa: E402
from electra_scale.engine import uploader  # noqa: E402
from electra_scale.engine.checkpoint import Checkpointer  # noqa: E402
from electra_scale.engine.objective import build_objective  # noqa: E402
from electra_scale.engine.step import build_engine, train_step  # noqa: E402
from electra_scale.engine.uploader import sha256_file  # noqa: E402
from electra_scale.infra import storage  # noqa: E402
from electra_scale.infra.launch import detect, init_distributed  # noqa: E402
from electra_scale.infra.s3server import SeaweedS3  # noqa: E402
from electra_scale.tools.bench.paths import fixed_batch  # noqa: E402
from tests.corpus import prepare_shards, write_corpus  # noqa: E402

OPS = 2000  # small tensor ops a probe step launches: a transformer layer's forward and backward launch ~100


class Probe:
    def __init__(self):
        self.a, self.b = torch.ones(64), torch.ones(64)
        self.device_s = 0.0

    def launch(self) -> float:
        started = time.perf_counter()
        x = self.a
        for _ in range(OPS):
            x = torch.add(x, self.b)
        return time.perf_counter() - started

    def host(self) -> float:
        started = time.perf_counter()
        self.launch()
        time.sleep(max(0.0, self.device_s - (time.perf_counter() - started)))
        return time.perf_counter() - started


def probe(p: Probe, steps: int, until: threading.Thread | None = None) -> dict[str, list[float]]:
    """``steps`` steps of each probe, alternated; with ``until``, only while that thread is alive."""
    out: dict[str, list[float]] = {"host": [], "launch": []}
    for _ in range(steps):
        if until is not None and not until.is_alive():
            break
        out["host"].append(p.host())
        out["launch"].append(p.launch())
    return out


def upload_work(path: Path, url: str) -> None:
    """What an upload thread did per file: lower its own priority (niceness is per thread on Linux, and the
    threads it starts inherit it), hash the file, upload it."""
    nice = os.getpriority(os.PRIO_PROCESS, 0) + uploader.UPLOAD_NICE
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    sha256_file(path)
    storage.upload_file(path, url)


CHILD = """
import os, sys
from pathlib import Path
from electra_scale.engine.uploader import sha256_file
from electra_scale.infra import storage
os.nice(int(sys.argv[1]))  # the parent's UPLOAD_NICE, as the uploader runs
print("ready", flush=True)
path, url = sys.stdin.readline().split()
sha256_file(Path(path))
storage.upload_file(path, url)
"""


def thread_or_process(p: Probe, path: Path, rounds: int) -> dict:
    """Probe steps while ``path`` is hashed and uploaded by a thread, by a child process, or by no one."""
    runs: dict[str, list[dict]] = {"thread": [], "process": [], "none": []}
    order = ["thread", "process", "none", "process", "thread", "none"] * max(1, rounds // 2)
    for i, mode in enumerate(order):
        url = f"s3://stall/ab/{i}/{path.name}"
        if mode == "thread":
            worker = threading.Thread(target=upload_work, args=(path, url))
            worker.start()
            runs[mode].append(probe(p, 10**9, until=worker))
            worker.join()
        elif mode == "process":
            command = [sys.executable, "-c", CHILD, str(uploader.UPLOAD_NICE)]
            child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
            assert child.stdout.readline().strip() == "ready"
            child.stdin.write(f"{path} {url}\n")
            child.stdin.flush()
            watcher = threading.Thread(target=child.wait)
            watcher.start()
            runs[mode].append(probe(p, 10**9, until=watcher))
            if child.wait() != 0:
                raise RuntimeError("the uploading child process failed")
        else:
            busy = [len(r["host"]) for r in runs["thread"] + runs["process"]]
            runs[mode].append(probe(p, max(busy) if busy else 200))
    out = {}
    for mode, trials in runs.items():
        out[mode] = {name: [x for t in trials for x in t[name]] for name in ("host", "launch")}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/large.yaml")
    ap.add_argument("--probe-steps", type=int, default=30)
    ap.add_argument("--out", default=None, help="a scratch directory (default: a temporary one)")
    ap.add_argument("--rounds", type=int, default=2, help="turns of thread / process / none in step 3")
    ap.add_argument("--no-nice", action="store_true", help="uploaders at the training thread's priority")
    ap.add_argument("--keep", action="store_true", help="keep the run's files (staging, SeaweedFS) afterwards")
    args = ap.parse_args()
    if args.no_nice:  # for the Checkpointer's uploader and step 3's alike
        uploader.UPLOAD_NICE = 0
    torch.set_num_threads(1)  # the training process's host thread; the other core is the upload's and S3's
    scratch = Path(args.out or tempfile.mkdtemp(prefix="save-stall-"))
    scratch.mkdir(parents=True, exist_ok=True)

    work = Path(tempfile.mkdtemp(prefix="run-", dir=scratch))
    corpus = write_corpus(work / "docs.jsonl")
    shards, vocab = prepare_shards(corpus, str(work / "shards"))
    overrides = [
        f"data.shards={shards}",
        "data.seq_len=128",
        "train.precision=fp32",
        "train.global_batch_size=1",
        "train.micro_batch_size=1",
        "model.dropout=0.0",
        "model.attention_dropout=0.0",
    ]
    cfg = load_config(str(ROOT / args.config), overrides)
    # The test corpus's small vocabulary makes the batch; the model keeps Large's (its ids are all in range).
    data_cfg = load_config(str(ROOT / args.config), [*overrides, f"model.vocab_size={vocab}"])
    server = SeaweedS3(work / "seaweedfs").start()
    os.environ.update(server.env())
    storage.reset_client()
    server.create_bucket("stall")
    # The store stands for a remote one: its server yields this machine's 2 cores to the process measured, as
    # a real object store takes none of the training node's. (Niceness is per thread: each of its threads.)
    for task in Path(f"/proc/{server.proc.pid}/task").iterdir():
        os.setpriority(os.PRIO_PROCESS, int(task.name), 19)
    try:
        env = detect()
        device = init_distributed(env)
        batches, special = fixed_batch(shards, data_cfg)
        torch.manual_seed(0)
        engine = build_engine(cfg, build_objective(cfg, special), 1, device)
        params = sum(p.numel() for p in engine.module.parameters())
        started = time.perf_counter()
        train_step(engine, batches, cfg, device, 1)
        step_s = time.perf_counter() - started
        checkpointer = Checkpointer("s3://stall/run", work / "staging", env, cfg.checkpoint)

        p = Probe()
        p.launch()
        p.device_s = 3 * statistics.median(p.launch() for _ in range(20))
        before = probe(p, args.probe_steps)

        state = {"step": 1, "world_size": 1, "zero_stage": 2, "global_batch_size": 1}
        started = time.perf_counter()
        tag = checkpointer.save(engine, 1, state, {})
        stall_s = time.perf_counter() - started
        staged = work / "staging" / "checkpoints" / tag
        size = sum(f.stat().st_size for f in staged.rglob("*") if f.is_file())
        module = work / "module.pt"  # step 3's file; staging is emptied once the upload is done
        os.link(staged / "mp_rank_00_model_states.pt", module)
        module_bytes = module.stat().st_size
        upload = checkpointer._upload  # noqa: SLF001 - the thread that waits for the uploader process
        during = probe(p, 10**9, until=upload)
        checkpointer.wait()
        upload_s = time.perf_counter() - started - stall_s
        after = probe(p, args.probe_steps)
        ab = thread_or_process(p, module, args.rounds)
        checkpointer.close()
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)  # 2 copies of the checkpoint: ~11 GB

    def median(xs: list[float]) -> float:
        return statistics.median(xs) if xs else float("nan")

    rows = {}
    for name in ("host", "launch"):
        base = median(before[name] + after[name])
        mean_base = statistics.fmean(before[name] + after[name])
        rows[name] = {
            "before_ms": 1e3 * median(before[name]),
            "after_ms": 1e3 * median(after[name]),
            "during_ms": 1e3 * median(during[name]),
            "steps_during": len(during[name]),
            "slowdown": median(during[name]) / base - 1,
            # The mean counts the rare long steps (a GIL hand-over waits up to sys.getswitchinterval(), 5 ms).
            "mean_slowdown": statistics.fmean(during[name]) / mean_base - 1 if during[name] else float("nan"),
            "p99_during_ms": 1e3 * statistics.quantiles(during[name], n=100)[98] if len(during[name]) > 1 else 0,
            "p99_base_ms": 1e3 * statistics.quantiles(before[name] + after[name], n=100)[98],
        }
    print(f"state: {params / 1e9:.3f} B parameters, checkpoint {size / 1e9:.2f} GB; one real step {step_s:.1f}s")
    print(f"save stall (save()'s call to its return: the local write and the barrier): {stall_s:.1f}s")
    print(f"hash + upload in the background: {upload_s:.1f}s ({size / 1e6 / upload_s:.0f} MB/s)")
    print(f"probe 'host' = {OPS} launches + device time {1e3 * p.device_s:.1f} ms; 'launch' = the launches alone")
    print("| probe | median before (ms) | during upload | after | steps during | slowdown: median | mean | p99 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['before_ms']:.2f} | {r['during_ms']:.2f} | {r['after_ms']:.2f} | {r['steps_during']} "
            f"| {100 * r['slowdown']:+.1f}% | {100 * r['mean_slowdown']:+.1f}% "
            f"| {r['p99_base_ms']:.2f} -> {r['p99_during_ms']:.2f} ms |"
        )
    none = {name: ab["none"][name] for name in ("host", "launch")}
    print(f"\nthe module file ({module_bytes / 1e9:.2f} GB) hashed and uploaded, {args.rounds} turns each:")
    print("| uploader | steps | host: median | mean | launch: median | mean |")
    print("|---|---|---|---|---|---|")
    ab_rows = {}
    for mode in ("thread", "process", "none"):
        r = {"steps": len(ab[mode]["host"])}
        for name in ("host", "launch"):
            r[name] = statistics.median(ab[mode][name]) / statistics.median(none[name]) - 1
            r[name + "_mean"] = statistics.fmean(ab[mode][name]) / statistics.fmean(none[name]) - 1
        ab_rows[mode] = r
        print(
            f"| {mode} | {r['steps']} | {100 * r['host']:+.1f}% | {100 * r['host_mean']:+.1f}% "
            f"| {100 * r['launch']:+.1f}% | {100 * r['launch_mean']:+.1f}% |"
        )
    result = {"params": params, "bytes": size, "step_s": step_s, "stall_s": stall_s, "upload_s": upload_s}
    print(json.dumps(result | {"device_ms": 1e3 * p.device_s, "probes": rows, "thread_or_process": ab_rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
