"""What a restart costs each node at 64 and 512 ranks, measured on checkpoints with the real file names and
counts, served by SeaweedFS through the suite's fault proxy (tests/faultproxy.py), which logs every request.

    .venv/bin/python scripts/restart_sim.py [--nodes 64] [--scale 100] [--configs 64:2,512:2,64:3,512:3]

For each world size W and ZeRO stage it writes one checkpoint as the trainer does (DeepSpeed's file names, one
optimizer shard and one RNG file per rank, at ZeRO-3 one model-state partition per rank too, and rank 0's
config, tokenizer, manifest and trainer state; its COMPLETE marker lists every file's size and sha256), with
configs/large.yaml's sizes (0.35 B parameters: the bf16 module 0.71 GB, the fp32 master weights and two Adam
moments 4.2 GB split over the ranks) divided by ``--scale`` for the model and optimizer files (the small files
keep their size). Then it restores it as ``--nodes`` simulated nodes of W / nodes ranks each, the way each
version of engine/checkpoint.py does, and counts at the proxy what each node asks the store for:

- before (main at 0f72cfa): each node's local rank 0 reads the marker, then a HEAD and the GETs of *every*
  file, one after the other, hashing each (the same for every node: measured on ``--before-nodes`` of them);
- after: rank 0 reads the marker once (the others get it by broadcast), each rank fetches its own files and
  each node's local rank 0 the shared ones, with no HEAD, the node's ranks in parallel (threads here); then a
  restart on the same nodes, whose staged copies match the marker, fetches nothing.

And rank 0's work after a save (the "tail"): before, a GET of each rank's part file, two listings, and one
DELETE per object of the pruned checkpoint; after, the parts come by a gather (no request), then COMPLETE,
``latest``, one listing and DeleteObjects (1,000 keys a request). Requests are counted, not timed, for the
tail; wall times are this machine's (a loopback store through a Python proxy: the requests' latency, not a
network's), so compare them with each other, not with a cluster. Prints a table; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests/: the fault proxy

from electra_scale.engine.checkpoint import MARKER, fetch_and_verify, needed_files, sha256_file  # noqa: E402
from electra_scale.infra import storage  # noqa: E402
from electra_scale.infra.s3server import SeaweedS3  # noqa: E402
from tests.faultproxy import FaultProxy  # noqa: E402

PARAMS = 0.35e9  # configs/large.yaml, generator included
MODULE_BYTES = int(PARAMS * 2)  # bf16
OPTIM_BYTES = int(PARAMS * 12)  # fp32 master weights + Adam's two moments
SMALL = {  # rank 0's own files, at their real sizes (bytes)
    "trainer_state.json": 2_000,
    "config.yaml": 3_000,
    "tokenizer/tokenizer.json": 700_000,
    "tokenizer/vocab.txt": 230_000,
    "data_manifest.json": 10_000,
}
RNG_BYTES = 15_000
TAG = "step_0001000"


def layout(world: int, zero: int, scale: int) -> dict[str, int]:
    """Every file of one checkpoint and its size."""
    files = dict(SMALL)
    for r in range(world):
        files[f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt"] = OPTIM_BYTES // world // scale
        files[f"rng/rank_{r}.pt"] = RNG_BYTES
        if zero == 3:
            files[f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"] = MODULE_BYTES // world // scale
    if zero != 3:
        files["mp_rank_00_model_states.pt"] = MODULE_BYTES // scale
    return files


def build(prefix: str, world: int, zero: int, scale: int, scratch: Path) -> dict:
    """Write the checkpoint's files and its COMPLETE marker to ``prefix``/TAG; returns the marker."""
    rng = os.urandom(1 << 20)
    meta = {}

    def put(item: tuple[str, int]) -> None:
        rel, size = item
        path = scratch / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:  # distinct bytes per file: a name and the same random MiB, repeated
            head = rel.encode()
            left = size
            while left > 0:
                chunk = (head + rng)[:left]
                f.write(chunk)
                left -= len(chunk)
        meta[rel] = {"size": size, "sha256": sha256_file(path)}
        storage.upload_file(path, storage.join(prefix, TAG, rel))
        path.unlink()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, layout(world, zero, scale).items()))
    marker = {"step": 1000, "tag": TAG, "world_size": world, "zero_stage": zero, "files": meta}
    storage.write_text(storage.join(prefix, TAG, MARKER), json.dumps(marker))
    return marker


class Counter:
    """Requests and bytes the store served, from the proxy's log: a GET's bytes are its range, else the whole
    object (its size from the marker, or a small JSON file's)."""

    def __init__(self, proxy: FaultProxy, sizes: dict[str, int]):
        self.proxy, self.sizes, self.mark = proxy, sizes, 0

    def start(self) -> None:
        self.mark = len(self.proxy.requests)

    def take(self) -> tuple[dict[str, int], int]:
        reqs = self.proxy.requests[self.mark :]
        self.start()
        kinds: dict[str, int] = {}
        served = 0
        for r in reqs:
            kind = "LIST" if r.method == "GET" and "list-type" in r.path else r.method
            if r.method == "POST" and "delete" in r.path:
                kind = "DeleteObjects"
            kinds[kind] = kinds.get(kind, 0) + 1
            if kind == "GET":
                rng = r.headers.get("range", "")
                if rng.startswith("bytes="):
                    a, b = rng[6:].split("-")
                    served += int(b) - int(a) + 1
                else:
                    served += self.sizes.get(r.path.split("?")[0].rsplit(f"/{TAG}/", 1)[-1], 0)
        return kinds, served


def restore_before(prefix: str, node_dir: Path) -> None:
    """engine/checkpoint.py at 0f72cfa: the node's local rank 0 reads the marker, then downloads (a HEAD, then
    the GETs) and hashes every file, one after the other."""
    marker = json.loads(storage.read_text(storage.join(prefix, TAG, MARKER)))
    for rel, meta in marker["files"].items():
        path = node_dir / TAG / rel
        storage.download_file(storage.join(prefix, TAG, rel), path)
        assert path.stat().st_size == meta["size"] and sha256_file(path) == meta["sha256"], rel


def restore_after(prefix: str, node_dir: Path, marker: dict, node: int, per_node: int, world: int, zero: int) -> None:
    """This version: rank 0 has read the marker (node 0 pays the GET), every rank of the node fetches what it
    loads, in parallel."""

    def rank(local: int) -> None:
        r = node * per_node + local
        problem = fetch_and_verify(prefix, node_dir, TAG, marker, needed_files(marker, r, local, world, zero))
        assert problem is None, problem

    if node == 0:
        storage.read_text(storage.join(prefix, TAG, MARKER))
    with ThreadPoolExecutor(per_node) as pool:
        list(pool.map(rank, range(per_node)))


def tail_before(prefix: str, world: int, doomed: str, marker_text: str) -> None:
    """Rank 0 after a save at 0f72cfa: every rank's part, COMPLETE, latest, two listings, a DELETE per object."""
    for r in range(world):
        storage.read_text(storage.join(prefix, TAG, "parts", f"rank_{r}.json"))
    storage.write_text(storage.join(prefix, TAG, MARKER), marker_text)
    storage.write_text(storage.join(prefix, "latest"), TAG)
    storage.list_files(prefix)
    storage.list_files(prefix)
    bucket, key = storage.split_s3(storage.join(prefix, doomed))
    for name in storage.list_files(storage.join(prefix, doomed)):
        storage.s3_client().delete_object(Bucket=bucket, Key=f"{key}/{name}")


def tail_after(prefix: str, doomed: str, marker_text: str) -> None:
    """Rank 0 after a save here: the parts came by a gather; COMPLETE, latest, one listing, DeleteObjects."""
    storage.write_text(storage.join(prefix, TAG, MARKER), marker_text)
    storage.write_text(storage.join(prefix, "latest"), TAG)
    listing = storage.list_files(prefix)
    storage.delete_files(prefix, [rel for rel in listing if rel.startswith(f"{doomed}/")])


def doomed_copy(prefix: str, world: int, zero: int) -> str:
    """An older checkpoint for the tail to prune: the same file names, 1 byte each."""
    old = "step_0000500"
    names = [*layout(world, zero, 1), MARKER, *(f"parts/rank_{r}.json" for r in range(world))]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda n: storage.write_bytes(storage.join(prefix, old, n), b"x"), names))
    return old


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=64)
    ap.add_argument("--scale", type=int, default=100, help="model and optimizer files' sizes divided by this")
    ap.add_argument("--configs", default="64:2,512:2,64:3,512:3", help="W:ZeRO stage, comma-separated")
    ap.add_argument("--before-nodes", type=int, default=2, help="nodes restored the old way (all alike)")
    args = ap.parse_args()
    configs = [tuple(int(x) for x in c.split(":")) for c in args.configs.split(",")]
    if any(w % args.nodes for w, _ in configs) or args.scale < 1:
        print(f"every W must be a multiple of --nodes={args.nodes}, and --scale >= 1", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="restart-sim-"))
    server = SeaweedS3(work / "seaweedfs").start()
    proxy = FaultProxy(server.endpoint).start()
    for key, value in {**server.env(), "AWS_ENDPOINT_URL": proxy.endpoint}.items():
        os.environ[key] = value
    storage.reset_client()
    rows, results = [], []
    try:
        for world, zero in configs:
            bucket = f"sim-{world}-{zero}"
            server.create_bucket(bucket)
            prefix = f"s3://{bucket}/run/checkpoints"
            marker = build(prefix, world, zero, args.scale, work / "build")
            for r in range(world):  # the parts the old tail reads
                part = {"writer": None, "files": {}}
                storage.write_text(storage.join(prefix, TAG, "parts", f"rank_{r}.json"), json.dumps(part))
            sizes = {rel: m["size"] for rel, m in marker["files"].items()}
            sizes[MARKER] = len(json.dumps(marker))
            per_node = world // args.nodes
            count = Counter(proxy, sizes)
            total = sum(sizes.values()) - sizes[MARKER]

            def measure(fn, *a, count=count) -> tuple[dict, int, float]:
                count.start()
                t0 = time.monotonic()
                fn(*a)
                wall = time.monotonic() - t0
                kinds, served = count.take()
                return kinds, served, wall

            before = []
            for node in range(args.before_nodes):
                node_dir = work / "nodes-before" / f"n{node}"
                before.append(measure(restore_before, prefix, node_dir))
                shutil.rmtree(node_dir)
            after, again = [], []
            for node in range(args.nodes):
                node_dir = work / "nodes" / f"n{node}"
                after.append(measure(restore_after, prefix, node_dir, marker, node, per_node, world, zero))
                if node in (0, 1):  # a restart on the same node: the staged copies match
                    again.append(measure(restore_after, prefix, node_dir, marker, node, per_node, world, zero))
                shutil.rmtree(node_dir)
            doomed = doomed_copy(prefix, world, zero)
            tb = measure(tail_before, prefix, world, doomed, json.dumps(marker))
            doomed = doomed_copy(prefix, world, zero)
            ta = measure(tail_after, prefix, doomed, json.dumps(marker))

            needed = [
                sum(
                    sizes[f]
                    for r in range(n * per_node, (n + 1) * per_node)
                    for f in set(needed_files(marker, r, r - n * per_node, world, zero))
                )
                for n in range(args.nodes)
            ]

            def stats(samples, label: str) -> dict:
                reqs = [sum(k.values()) for k, _, _ in samples]
                got = [b for _, b, _ in samples]
                walls = [w for _, _, w in samples]
                kinds: dict[str, int] = {}
                for k, _, _ in samples:
                    for name, n in k.items():
                        kinds[name] = max(kinds.get(name, 0), n)
                return {
                    "phase": label,
                    "requests_max": max(reqs),
                    "requests_mean": sum(reqs) / len(reqs),
                    "kinds_max": kinds,
                    "bytes_mean": sum(got) / len(got),
                    "wall_s_mean": sum(walls) / len(walls),
                    "wall_s_max": max(walls),
                }

            result = {
                "world": world,
                "zero": zero,
                "files": len(marker["files"]),
                "checkpoint_bytes": total,
                "needed_bytes_mean": sum(needed) / len(needed),
                "before": stats(before, "before"),
                "after": stats(after, "after"),
                "after_restart_staged": stats(again, "staged"),
                "rank0_tail_before": sum(tb[0].values()),
                "rank0_tail_before_kinds": tb[0],
                "rank0_tail_after": sum(ta[0].values()),
                "rank0_tail_after_kinds": ta[0],
            }
            results.append(result)
            need = result["needed_bytes_mean"]
            for s in (result["before"], result["after"], result["after_restart_staged"]):
                rows.append(
                    f"W={world:>3} ZeRO-{zero} {result['files']:>5} files | {s['phase']:<7} | requests/node "
                    f"{s['requests_max']:>5} | {s['bytes_mean'] / 1e6:8.1f} MB/node ({s['bytes_mean'] / need:4.2f}x "
                    f"needed) | {s['wall_s_mean']:6.2f} s/node (max {s['wall_s_max']:.2f})"
                )
            rows.append(
                f"W={world:>3} ZeRO-{zero} rank 0's tail after a save: {result['rank0_tail_before']} requests "
                f"{tb[0]} -> {result['rank0_tail_after']} {ta[0]}"
            )
            print(rows[-4:] and "\n".join(rows[-4:]), flush=True)
    finally:
        proxy.stop()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nsizes: model and optimizer files / {args.scale}; {args.nodes} nodes; one process, this machine")
    print(json.dumps({"scale": args.scale, "nodes": args.nodes, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
