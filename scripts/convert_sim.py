"""What converting a ZeRO checkpoint to another world size costs at W = 64 and 512 ranks, measured with real
DeepSpeed files and DeepSpeed's own converter, on one machine.

    .venv/bin/python scripts/convert_sim.py --work /work/exp/convsim [--stages 2,3] [--world-sizes 64,512]
        [--extract-workers 2] [--merge-workers 1] [--verify 64]

A resume on another world size (engine/checkpoint.py) runs, once, on one node,
``python -m deepspeed.checkpoint.ds_to_universal --input_folder SRC --output_folder DST --inject_missing_state
--num_extract_workers N --num_merge_workers M``. Its cost is set by the number of per-rank files it reads and
the fragment files it writes in between, which grow with the world size the checkpoint was saved at, and by
the bytes. 64 or 512 DeepSpeed ranks cannot run here, so:

1. ``electra-scale pretrain`` trains configs/large.yaml's layout (24 layers, the generator 1/4 wide, the same
   784 tensors under the same names as Large, so every file count is Large's) at a smaller width (hidden 256,
   FFN 1024, generator 64, the test corpus's 186-token vocabulary, 128 positions: 20.3 M parameters, 1/17.4 of
   Large's 354.7 M) for 2 steps on 2 ranks, fp32, at ZeRO-2 and at ZeRO-3: real DeepSpeed checkpoints.
2. This script repartitions each into the per-rank files DeepSpeed writes at W ranks (the layouts below, read
   from deepspeed/runtime/zero/stage_1_and_2.py and stage3.py of DeepSpeed 0.19.8).
3. It runs the real converter on each, with the worker counts given, and reports files, bytes, wall time,
   CPU time of the converter and its workers (os.wait4), and their memory (sampled from /proc).

``--verify W`` proves the repartitioning right: split to the source's own world size, every file equals the
source's, object by object (the layout, the fragment mappings, the paddings); and the universal checkpoint
converted from the W-rank split equals, tensor by tensor (fp32, exp_avg, exp_avg_sq, step), the one converted
from the real 2-rank checkpoint. Prints a table; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests/: the corpus the suite and the soak train on

import torch  # noqa: E402
from deepspeed.utils.tensor_fragment import fragment_address  # noqa: E402

from electra_scale.infra.launch import cli_command  # noqa: E402

# The source runs: configs/large.yaml's layout at 1/4 of its width (so 1/17.4 of its parameters; the tiny
# corpus's vocabulary, 128 positions). embedding_size == hidden_size keeps Large's tensor set: the
# discriminator then has no embeddings_project, the generator (narrower) has one.
SCALED = (
    "model.hidden_size=256",
    "model.embedding_size=256",
    "model.intermediate_size=1024",
    "model.num_heads=4",
    "model.generator_hidden_size=64",
    "model.max_position_embeddings=128",
)
LARGE_PARAMS = 354_655_291  # configs/large.yaml built on the meta device, generator included, tied once
LARGE_TENSORS = 784
SOURCE_RANKS = 2  # rank 0's files differ from the others' (ZeRO-3: shared_params), so the source has both kinds
ALIGN = 2  # stage_1_and_2.py nccl_start_alignment_factor: a group's flat buffer is padded to a multiple of 2 * W


def ds_files(folder: Path) -> list[Path]:
    """The DeepSpeed files of a checkpoint folder (what ds_to_universal reads), not the trainer's own."""
    return sorted(p for p in folder.iterdir() if p.name.endswith(("_model_states.pt", "_optim_states.pt")))


def rank_of(path: Path) -> int:
    return int(re.search(r"zero_pp_rank_(\d+)_", path.name).group(1))


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


# ------------------------------------------------------------------------------------------ making sources
def make_sources(work: Path) -> dict[int, Path]:
    """The real 2-rank checkpoints, trained once (kept in WORK for the next run)."""
    from tests.corpus import prepare_shards, write_corpus

    shards = work / "shards"
    if not (shards / "manifest.json").exists():
        prepare_shards(write_corpus(work / "docs.jsonl"), str(shards))
    from electra_scale.data import load_manifest

    vocab = load_manifest(str(shards)).vocab_size
    sources = {}
    for stage in (2, 3):
        out = work / f"src_zero{stage}"
        found = sorted(out.glob("checkpoints/step_*/COMPLETE"))
        if not found:
            args = [
                "pretrain",
                "--config",
                "configs/large.yaml",
                f"data.shards={shards}",
                f"run.output_dir={out}",
                f"model.vocab_size={vocab}",
                *SCALED,
                "data.seq_len=128",
                "data.num_workers=1",
                "data.partitions=4",  # Large's 512 is more than the test corpus's 454 examples
                "train.global_batch_size=4",
                "train.micro_batch_size=2",
                "train.precision=fp32",  # the CPU's; on GPUs Large is bf16 (its module file is then half as big)
                "train.max_steps=2",
                "checkpoint.every_steps=2",
                "optim.warmup_steps=1",  # a nonzero learning rate at step 2, so the weights have moved
                f"train.deepspeed_config=ds_configs/zero{stage}.json",
            ]
            env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
            print(f"training the ZeRO-{stage} source ({SOURCE_RANKS} ranks) into {out}", flush=True)
            with open(work / f"src_zero{stage}.log", "w") as log:
                rc = subprocess.run(cli_command(args, SOURCE_RANKS), cwd=ROOT, env=env, stdout=log, stderr=log)
            if rc.returncode:
                raise SystemExit(f"the ZeRO-{stage} source run failed ({rc.returncode}): see {log.name}")
            found = sorted(out.glob("checkpoints/step_*/COMPLETE"))
        sources[stage] = found[-1].parent
    return sources


# ------------------------------------------------------------------------------------------ repartitioning
def _zero2_group_layout(numels: list[int], paddings: list[int]) -> tuple[list[int], int]:
    """Each parameter's offset in its group's flat buffer, and the buffer's length before the alignment to
    2 * W (stage_1_and_2.py: parameters back to back, each followed by its parameter-alignment padding)."""
    offsets, at = [], 0
    for numel, pad in zip(numels, paddings):
        offsets.append(at)
        at += numel + pad
    return offsets, at


@torch.no_grad()  # the fp32 buffers are saved as leaves that require grad: copied, not traced
def split_zero2(src: Path, dst: Path, world: int) -> None:
    """ZeRO-1/2 at ``world`` ranks: the one model-state file, and per rank its slice of each group's flat fp32
    buffer and Adam moments, as BF16/FP16 ZeRO's ``state_dict`` writes them."""
    model = load(src / "mp_rank_00_model_states.pt")
    optim = [load(p) for p in sorted(src.glob("zero_pp_rank_*_optim_states.pt"), key=rank_of)]
    osd0 = optim[0]["optimizer_state_dict"]
    assert "state" in osd0["base_optimizer_state"], "elastic_checkpoint=true is not handled (not our config)"
    groups = len(osd0["single_partition_of_fp32_groups"])
    grad = osd0["single_partition_of_fp32_groups"][0].requires_grad  # True as DeepSpeed saves them
    flat = {}  # (group, key) -> the unpadded flat buffer (parameter-alignment paddings included)
    step = {}
    for g in range(groups):
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            parts = []
            for sd in optim:
                osd = sd["optimizer_state_dict"]
                pad = osd["group_paddings"][g]
                if key == "fp32":
                    parts.append(osd["single_partition_of_fp32_groups"][g])  # saved without its padding
                else:  # the base optimizer's own state_dict: the whole partition, padding included
                    t = osd["base_optimizer_state"]["state"][g][key]
                    parts.append(t[: t.numel() - pad])
            flat[g, key] = torch.cat(parts)
        step[g] = osd0["base_optimizer_state"]["state"][g]["step"]
    names = [list(shapes) for shapes in model["param_shapes"]]
    numels = [[math.prod(s) for s in shapes.values()] for shapes in model["param_shapes"]]
    layouts = [_zero2_group_layout(numels[g], osd0["param_alignment_paddings"][g]) for g in range(groups)]
    for g in range(groups):
        assert flat[g, "fp32"].numel() == layouts[g][1], (g, flat[g, "fp32"].numel(), layouts[g][1])

    dst.mkdir(parents=True, exist_ok=True)
    model = dict(model, dp_world_size=world)
    torch.save(model, dst / "mp_rank_00_model_states.pt")
    template = optim[0]
    for rank in range(world):
        paddings, fp32, state, mappings = [], [], {}, []
        for g in range(groups):
            offsets, numel = layouts[g]
            aligned = -(-numel // (ALIGN * world)) * (ALIGN * world)
            size = aligned // world  # get_data_parallel_partitions: equal parts, as aligned divides by W
            start, end = rank * size, (rank + 1) * size
            # stage_1_and_2.py __init__: the padding at the end of this rank's partition.
            pad = size if numel <= start else (end - numel if numel < end else 0)
            paddings.append(pad)
            lean = size - pad
            fp32.append(flat[g, "fp32"][start : start + lean].clone().requires_grad_(grad))
            moments = {"step": step[g]}  # a tensor or an int: shared, never written to
            for key in ("exp_avg", "exp_avg_sq"):
                moments[key] = torch.cat([flat[g, key][start : start + lean], torch.zeros(pad)])
            state[g] = moments
            # mixed_precision_linkage._init_lp_to_hp_mapping: a parameter is in the partition when it starts
            # in it or starts before and ends after its start; its fragment is the overlap.
            mapping = OrderedDict()
            for name, offset, n in zip(names[g], offsets, numels[g]):
                if start <= offset < end or offset < start < offset + n:
                    lo, hi = max(offset, start), min(offset + n, end)
                    mapping[name] = fragment_address(numel=hi - lo, start=lo - start)
            mappings.append(mapping)
        osd = dict(template["optimizer_state_dict"])
        osd["base_optimizer_state"] = {
            "state": state,
            "param_groups": template["optimizer_state_dict"]["base_optimizer_state"]["param_groups"],
        }
        osd["single_partition_of_fp32_groups"] = fp32
        osd["group_paddings"] = paddings
        osd["partition_count"] = [world] * groups
        osd["param_slice_mappings"] = mappings
        torch.save(dict(template, optimizer_state_dict=osd), dst / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")


@torch.no_grad()  # the fp32 buffers are saved as leaves that require grad: copied, not traced
def split_zero3(src: Path, dst: Path, world: int) -> None:
    """ZeRO-3 at ``world`` ranks: per rank a model-state file (the module's placeholders, the shapes) and its
    chunk of every parameter (each padded to a multiple of W: stage3 ``_rigid_state_dict``'s
    fp32_partitioned_groups_flat and the optimizer's moments over the same flat sub-groups)."""
    models = [load(p) for p in sorted(src.glob("zero_pp_rank_*_model_states.pt"), key=rank_of)]
    optim = [load(p) for p in sorted(src.glob("zero_pp_rank_*_optim_states.pt"), key=rank_of)]
    src_world = len(optim)
    grad = optim[0]["optimizer_state_dict"]["fp32_flat_groups"][0].requires_grad  # True as DeepSpeed saves them
    shapes = models[0]["param_shapes"]  # one OrderedDict per flat sub-group, in the flat buffer's order
    osd0 = optim[0]["optimizer_state_dict"]
    assert osd0["partition_count"] == src_world and not osd0.get("ds_zero_partition_groups")
    full = {}  # (group, key) -> [each parameter's full flat tensor]
    for g, group in enumerate(shapes):
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            ranks = [
                sd["optimizer_state_dict"]["fp32_flat_groups"][g]
                if key == "fp32"
                else sd["optimizer_state_dict"]["optimizer_state_dict"]["state"][g][key]
                for sd in optim
            ]
            params, offset = [], 0
            for shape in group.values():
                n = math.prod(shape)
                chunk = -(-n // src_world)
                params.append(torch.cat([t[offset : offset + chunk] for t in ranks])[:n])
                offset += chunk
            assert offset == ranks[0].numel(), (g, offset, ranks[0].numel())
            full[g, key] = params

    dst.mkdir(parents=True, exist_ok=True)
    for rank in range(world):
        # Rank 0's model-state file is not the others' (it alone lists shared_params): each takes its kind's.
        model = dict(models[min(rank, src_world - 1)], dp_world_size=world)
        torch.save(model, dst / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
        template = optim[min(rank, src_world - 1)]
        flat, state = [], {}
        for g in range(len(shapes)):
            per_key = {}
            for key in ("fp32", "exp_avg", "exp_avg_sq"):
                chunks = []
                for tensor in full[g, key]:
                    chunk = -(-tensor.numel() // world)
                    piece = tensor[rank * chunk : (rank + 1) * chunk]
                    chunks.append(torch.cat([piece, torch.zeros(chunk - piece.numel())]))
                per_key[key] = torch.cat(chunks)
            flat.append(per_key.pop("fp32").requires_grad_(grad))
            step = template["optimizer_state_dict"]["optimizer_state_dict"]["state"][g]["step"]
            state[g] = {"step": step, **per_key}
        osd = dict(template["optimizer_state_dict"], partition_count=world, fp32_flat_groups=flat)
        osd["optimizer_state_dict"] = dict(osd["optimizer_state_dict"], state=state)
        torch.save(dict(template, optimizer_state_dict=osd), dst / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")


SPLIT = {2: split_zero2, 3: split_zero3}


def fragments_expected(folder: Path, stage: int) -> int:
    """The fragment files ds_to_universal writes (its extract step: dump_param_fragment once per parameter,
    state and rank): ZeRO-2, per rank, each parameter its partition touches x (fp32, exp_avg, exp_avg_sq, step);
    ZeRO-3, every rank holds a chunk of every parameter (an empty one too is written) x 3 states."""
    if stage == 3:
        shapes = load(next(folder.glob("zero_pp_rank_0_mp_rank_00_model_states.pt")))["param_shapes"]
        return len(list(folder.glob("*_optim_states.pt"))) * sum(len(g) for g in shapes) * 3
    total = 0
    for path in folder.glob("*_optim_states.pt"):
        osd = load(path)["optimizer_state_dict"]
        for g, mapping in enumerate(osd["param_slice_mappings"]):
            total += len(mapping) * (3 + ("step" in osd["base_optimizer_state"]["state"][g]))
    return total


def large_counts(scaled_shapes: list, worlds: list[int]) -> dict:
    """The file counts at Large's real sizes (configs/large.yaml built on the meta device), same grouping.
    Input, output and ZeRO-3 fragment counts depend only on the tensors and W, so they are the measured ones;
    a ZeRO-2 fragment is a (parameter, rank) overlap, which depends on the sizes: counted here with the split's
    own layout rules (parameters back to back, the group padded to 2 * W, W equal partitions)."""
    from electra_scale.config import load_config
    from electra_scale.engine.model import build_electra

    cfg = load_config(str(ROOT / "configs/large.yaml"))
    with torch.device("meta"):
        generator, discriminator = build_electra(cfg.model)
    real = {}
    for prefix, module in (("generator.", generator), ("discriminator.", discriminator)):
        for name, param in module.named_parameters():  # a tied tensor is listed once, under its first name
            real.setdefault(prefix + name, math.prod(param.shape))
    numels = [[real[name] for name in group] for group in scaled_shapes]
    return {
        "params": sum(map(sum, numels)),
        "zero2_fragments": {world: zero2_fragment_count(numels, world) for world in worlds},
    }


def zero2_fragment_count(numels: list[list[int]], world: int) -> int:
    """ZeRO-2 fragment files at W ranks of groups of parameters of these sizes (no parameter-alignment padding,
    DeepSpeed's default): per parameter, the partitions from its first element's to its last's, x 4 states."""
    total = 0
    for group in numels:
        size = -(-sum(group) // (ALIGN * world)) * ALIGN  # (group aligned to 2 * W) / W
        offset = 0
        for n in group:
            total += (offset + n - 1) // size - offset // size + 1
            offset += n
    return 4 * total  # fp32, exp_avg, exp_avg_sq, step


# ------------------------------------------------------------------------------------------ measuring
def tree(folder: Path) -> tuple[int, int]:
    files = size = 0
    for root, _, names in os.walk(folder):
        for name in names:
            files += 1
            size += os.stat(os.path.join(root, name)).st_size
    return files, size


def _tree_memory(root: int) -> tuple[int, int]:
    """(sum of PSS, largest RSS) in bytes over a process and its descendants, now."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, ppid in parent.items() if ppid in tree} - tree
        tree |= more
        grew = bool(more)
    pss = rss = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.endswith("kB\n")}
        except OSError:
            continue
        pss += fields.get("Pss", 0)
        rss = max(rss, fields.get("Rss", 0))
    return pss, rss


def run_measured(cmd: list[str], log: Path) -> dict:
    """Runs cmd; wall time, the CPU time of it and every process it waited for (wait4's rusage: the
    converter's ProcessPoolExecutor workers included), when each line of its output came, and its memory.
    Memory is sampled (5 Hz) from /proc: the peak of the PSS summed over the process and its workers (what the
    node must hold at once), and the largest RSS of one of them. Not ru_maxrss: Linux carries a process's
    high-water RSS across fork and exec, so a child of this (large) process would report this one's."""
    # Unbuffered: the converter's "*** N." lines must arrive when printed, to time its phases.
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    peak = [0, 0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            pss, rss = _tree_memory(proc.pid)
            peak[0], peak[1] = max(peak[0], pss), max(peak[1], rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    marks = {}
    with open(log, "w") as f:
        for line in proc.stdout:
            f.write(line)
            if line.startswith("*** "):
                marks[line[4:].strip()] = round(time.monotonic() - t0, 2)
    # Stop sampling before the reap: after it the pid (and its /proc entry) may be another process's.
    done.set()
    sampler.join()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - t0
    if proc.returncode:
        raise SystemExit(f"{cmd[2] if len(cmd) > 2 else cmd[0]} failed ({proc.returncode}): see {log}")
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_pss_mb": peak[0] / 2**20,
        "peak_rss_mb": peak[1] / 2**20,
        "marks": marks,
    }


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def check_resources(folder: Path, stage: int, fragments: int, extract: int, merge: int) -> None:
    """Stop before a conversion this machine cannot finish: the disk holds the fragments (each at least one
    4 KiB block) and the output (about the input) beside the input; memory holds a rank's file per extract
    worker and every state of the largest parameter per merge worker, plus each process's torch (~0.5 GB)."""
    inp = sum(p.stat().st_size for p in ds_files(folder))
    largest_file = max(p.stat().st_size for p in ds_files(folder))
    disk_need = 2.2 * inp + fragments * 4096
    vfs = os.statvfs(folder)
    free, inodes = vfs.f_bavail * vfs.f_frsize, vfs.f_favail
    if free < disk_need or inodes < 1.2 * fragments:
        raise SystemExit(
            f"not enough disk under {folder}: the conversion needs ~{disk_need / 1e9:.1f} GB and "
            f"{fragments:,} inodes, {free / 1e9:.1f} GB and {inodes:,} are free; use a smaller --work or fewer ranks"
        )
    shapes = load(next(folder.glob("*_model_states.pt")))["param_shapes"]
    largest_param = max(math.prod(s) for g in shapes for s in g.values()) * 4
    mem_need = extract * (2 * largest_file + 5e8) + merge * (6 * largest_param + 5e8)
    if mem_available() < mem_need:
        raise SystemExit(
            f"not enough memory: the conversion needs ~{mem_need / 1e9:.1f} GB, {mem_available() / 1e9:.1f} GB "
            "is available; use fewer workers"
        )


def convert(folder: Path, out: Path, stage: int, extract: int, merge: int) -> dict:
    """The real converter, as engine/checkpoint.py runs it, with the temp folder kept so that its fragment files
    can be counted after the timed run; removing them (which ds_to_universal would do itself) is timed apart
    with ``rm -rf`` and added."""
    fragments = fragments_expected(folder, stage)
    check_resources(folder, stage, fragments, extract, merge)
    if out.exists():
        shutil.rmtree(out)
    inp = ds_files(folder)
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(folder),
        "--output_folder",
        str(out),
        "--inject_missing_state",
        "--num_extract_workers",
        str(extract),
        "--num_merge_workers",
        str(merge),
        "--keep_temp_folder",
    ]
    m = run_measured(cmd, out.parent / f"{out.name}.log")
    tmp = out / "tmp"
    m["fragment_files"], m["fragment_bytes"] = tree(tmp)
    assert m["fragment_files"] == fragments, (m["fragment_files"], fragments)
    rm = run_measured(["rm", "-rf", str(tmp)], out.parent / f"{out.name}.rm.log")
    m["rm_s"] = rm["wall_s"]
    m["wall_s"] += rm["wall_s"]
    m["cpu_s"] += rm["cpu_s"]
    m["input_files"], m["input_bytes"] = len(inp), sum(p.stat().st_size for p in inp)
    m["output_files"], m["output_bytes"] = tree(out)
    return m


# ------------------------------------------------------------------------------------------ verifying
def differences(a, b, where: str = "") -> list[str]:
    """Where two loaded checkpoint objects differ (tensors by value and dtype, containers by keys and order)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        ok = torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
        ok = ok and type(a) is type(b) and a.requires_grad == b.requires_grad
        return [] if ok else [where]
    if type(a) is not type(b):
        return [f"{where}: {type(a).__name__} vs {type(b).__name__}"]
    if isinstance(a, dict):
        if list(a) != list(b):
            return [f"{where}: keys {sorted(set(a) ^ set(b), key=str)[:5]} or their order"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    if hasattr(a, "__dict__") and not isinstance(a, type):
        return differences(vars(a), vars(b), where)
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


@torch.no_grad()  # the fp32 buffers are saved as leaves that require grad: copied, not traced
def _zero_padding(osd: dict, shapes: list, world: int, rank: int) -> None:
    """ZeRO-3 pads each parameter to a multiple of W and leaves whatever the padding held there (one element of
    the real rank 1's fp32 is -0.0595): the split writes zeros, the converter reads neither. Zeroed to compare."""
    for g, group in enumerate(shapes):
        tensors = [
            osd["fp32_flat_groups"][g],
            *(osd["optimizer_state_dict"]["state"][g][k] for k in ("exp_avg", "exp_avg_sq")),
        ]
        offset = 0
        for shape in group.values():
            n = math.prod(shape)
            chunk = -(-n // world)
            real = max(0, min(chunk, n - rank * chunk))
            for t in tensors:
                t[offset + real : offset + chunk] = 0
            offset += chunk


def verify_round_trip(src: Path, stage: int, scratch: Path) -> int:
    """Split to the source's own world size: every DeepSpeed file must come back as the source wrote it."""
    again = scratch / f"roundtrip_zero{stage}"
    SPLIT[stage](src, again, len(list(src.glob("*_optim_states.pt"))))
    names = [p.name for p in ds_files(src)]
    assert names == [p.name for p in ds_files(again)], (names, ds_files(again))
    shapes = load(next(src.glob("*_model_states.pt")))["param_shapes"]
    for name in names:
        real = load(src / name)
        if stage == 3 and name.endswith("_optim_states.pt"):
            _zero_padding(real["optimizer_state_dict"], shapes, len(names) // 2, rank_of(src / name))
        diff = differences(real, load(again / name), name)
        if diff:
            raise SystemExit(f"ZeRO-{stage} round trip differs: {diff[:10]}")
    shutil.rmtree(again)
    return len(names)


def verify_universal(reference: Path, candidate: Path) -> int:
    """Every tensor file of two universal checkpoints (zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt) equal."""
    ref = sorted(p.relative_to(reference) for p in (reference / "zero").rglob("*.pt"))
    cand = sorted(p.relative_to(candidate) for p in (candidate / "zero").rglob("*.pt"))
    if ref != cand:
        raise SystemExit(f"the universal checkpoints hold different files: {sorted(set(ref) ^ set(cand))[:5]}")
    compared = 0
    for rel in ref:
        if rel.name == "optimizer_state.pt":  # partition_count and the like: W's own, by design
            continue
        diff = differences(load(reference / rel), load(candidate / rel), str(rel))
        if diff:
            raise SystemExit(f"universal checkpoints differ: {diff[:5]}")
        compared += 1
    return compared


# ------------------------------------------------------------------------------------------ main
def row(stage: int, world: int, m: dict) -> str:
    return (
        f"| ZeRO-{stage} | {world} | {m['input_files']:,} | {m['fragment_files']:,} | {m['output_files']:,} | "
        f"{m['input_bytes'] / 1e6:,.0f} MB in, {m['fragment_bytes'] / 1e6:,.0f} MB fragments, "
        f"{m['output_bytes'] / 1e6:,.0f} MB out | {m['wall_s']:,.1f} s | {m['cpu_s']:,.1f} | "
        f"{m['peak_pss_mb']:,.0f} MB ({m['peak_rss_mb']:,.0f} MB) |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="sources are trained (once) and conversions run here")
    ap.add_argument("--stages", default="2,3")
    ap.add_argument("--world-sizes", default="64,512")
    ap.add_argument("--extract-workers", type=int, default=2)
    ap.add_argument("--merge-workers", type=int, default=1)
    ap.add_argument("--verify", default="64", help="world sizes whose universal checkpoint is checked ('' none)")
    ap.add_argument("--keep", action="store_true", help="keep the split checkpoints and conversions")
    args = ap.parse_args()
    stages = [int(s) for s in args.stages.split(",")]
    worlds = [int(w) for w in args.world_sizes.split(",")]
    verify = {int(w) for w in args.verify.split(",") if w}
    args.work.mkdir(parents=True, exist_ok=True)
    sources = make_sources(args.work)
    scratch = args.work / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    results = []
    print(f"workers: {args.extract_workers} extract, {args.merge_workers} merge", flush=True)
    shapes = {}
    for stage in stages:
        src = sources[stage]
        shapes[stage] = load(next(src.glob("*_model_states.pt")))["param_shapes"]
        reference = None
        if verify & set(worlds):
            files = verify_round_trip(src, stage, scratch)
            print(f"ZeRO-{stage}: split to its own {SOURCE_RANKS} ranks, all {files} files equal the source's")
            # The reference: the real checkpoint, converted as it is (its row is the W = 2 one).
            reference = scratch / f"zero{stage}_w{SOURCE_RANKS}" / "universal"
            reference.parent.mkdir()
            m = convert(src, reference, stage, args.extract_workers, args.merge_workers)
            results.append({"stage": stage, "world": SOURCE_RANKS, "real": True, **m})
            print(row(stage, SOURCE_RANKS, m), flush=True)
        for world in worlds:
            base = scratch / f"zero{stage}_w{world}"
            t0 = time.monotonic()
            SPLIT[stage](src, base / "ckpt", world)
            split_s = time.monotonic() - t0
            m = convert(base / "ckpt", base / "universal", stage, args.extract_workers, args.merge_workers)
            m["split_s"] = split_s
            if world in verify:
                m["verified_tensor_files"] = verify_universal(reference, base / "universal")
                print(
                    f"ZeRO-{stage} W={world}: its universal checkpoint equals the real checkpoint's, "
                    f"{m['verified_tensor_files']} tensor files"
                )
            results.append({"stage": stage, "world": world, "real": False, **m})
            print(row(stage, world, m), f"(phases at {m['marks']})", flush=True)
            if not args.keep:
                shutil.rmtree(base)
        if reference is not None and not args.keep:
            shutil.rmtree(reference.parent)
    # The counting rule, checked on what the converter wrote, then applied to Large's real sizes.
    numels = {stage: [[math.prod(x) for x in g.values()] for g in shapes[stage]] for stage in shapes}
    for r in results:
        if r["stage"] == 2:
            assert zero2_fragment_count(numels[2], r["world"]) == r["fragment_files"], r
    large = large_counts(next(iter(shapes.values())), sorted({SOURCE_RANKS, *worlds}))
    print(
        f"at Large's sizes ({large['params']:,} parameters, {LARGE_TENSORS} tensors): ZeRO-2 fragment files "
        + ", ".join(f"W={w}: {n:,}" for w, n in large["zero2_fragments"].items())
        + " (the rule matches every ZeRO-2 count measured here); every other count is the same as measured"
    )
    print(
        json.dumps(
            {
                "large": large,
                "extract_workers": args.extract_workers,
                "merge_workers": args.merge_workers,
                "runs": results,
            }
        )
    )


if __name__ == "__main__":
    main()
