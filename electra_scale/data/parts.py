"""A prepare split into tasks: which units each task takes, the markers that say what is done, and the
finalize step that merges the parts into the one ``manifest.json`` that ``pretrain`` reads.

Under the output, next to the shards::

    parts/units/unit-000042.json     written after unit 42's shards: its shards, blocks and counts
    parts/part-00002-of-00003.json   written last by task 2 of 3: its settings, units, time

A unit counts once its marker exists, a task once its part does (datatrove's completion markers): a killed task
leaves neither, and its re-run redoes only its units that have no marker. ``finalize`` writes the manifest
(the held-out set's first) in one atomic write, and only when every part is there.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from dataclasses import asdict
from typing import Any

from electra_scale.data.shards import FORMAT, MANIFEST, BlockInfo, DataError, Manifest, ShardInfo, load_manifest
from electra_scale.data.units import Unit
from electra_scale.infra import storage

PARTS = "parts"

# The settings that fix the units' bytes (what a task's and finalize's arguments must agree on), with the flag
# that sets each, for the messages.
FLAGS = {
    "files": "--input",
    "text_column": "--text-column",
    "tokenizer_sha256": "--tokenizer",
    "seq_len": "--seq-len",
    "samples_per_shard": "--samples-per-shard",
    "samples_per_block": "--samples-per-block",
    "seed": "--seed",
    "eval_fraction": "--eval-fraction",
    "eval_output": "--eval-out",
    "lowercase": "--cased",
    "chunk_bytes": "--chunk-bytes",
    "sizes": "--input (the inputs' sizes)",
}


def settings_sha(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def assign(units: list[Unit], task: int, num_tasks: int) -> list[Unit]:
    """Task ``task``'s units: a contiguous run, the tasks' runs about equal in bytes (a unit goes to the task
    whose share of the bytes holds its middle)."""
    total = max(1, sum(u.bytes for u in units))
    mine, before = [], 0
    for u in units:
        if min(num_tasks - 1, (2 * before + u.bytes) * num_tasks // (2 * total)) == task:
            mine.append(u)
        before += u.bytes
    return mine


def part_name(task: int, num_tasks: int) -> str:
    return f"part-{task:05d}-of-{num_tasks:05d}.json"


def unit_url(output: str, index: int) -> str:
    return storage.join(output, PARTS, "units", f"unit-{index:06d}.json")


def done_unit(output: str, index: int, sha: str) -> dict | None:
    """Unit ``index``'s result if an earlier run of the same settings finished it, else None."""
    url = unit_url(output, index)
    if not storage.exists(url):
        return None
    result = json.loads(storage.read_text(url))
    return result if result.get("settings_sha256") == sha else None


def write_unit(output: str, result: dict) -> None:
    storage.write_text(unit_url(output, result["unit"]), json.dumps(result) + "\n")


def write_part(output: str, task: int, num_tasks: int, settings: dict, results: list[dict], seconds: float) -> None:
    part = {"task": task, "num_tasks": num_tasks, "settings": settings, "seconds": round(seconds, 3)}
    part["units"] = results
    storage.write_text(storage.join(output, PARTS, part_name(task, num_tasks)), json.dumps(part) + "\n")


def is_unfinalized(prefix: str) -> bool:
    """Parts there but no manifest: a split prepare whose finalize has not run (yet)."""
    return any(n.startswith("part-") for n in storage.list_files(storage.join(prefix, PARTS)))


def read_parts(output: str) -> tuple[int, list[dict]]:
    """(the number of tasks, their parts), or a DataError naming the tasks whose parts are missing."""
    names = [n for n in storage.list_files(storage.join(output, PARTS)) if n.startswith("part-")]
    if not names:
        raise DataError(
            f"no parts at {output}/{PARTS}: run the tasks (`electra-scale prepare ... --task-index K --num-tasks N`) "
            "before `prepare --finalize`"
        )
    counts = sorted({int(n.split("-of-")[1].split(".")[0]) for n in names})
    if len(counts) > 1:
        raise DataError(
            f"{output}/{PARTS} holds parts of runs split {' and '.join(map(str, counts))} ways; delete the parts of "
            "the split you abandoned, then finalize"
        )
    n = counts[0]
    missing = [k for k in range(n) if part_name(k, n) not in names]
    if missing:
        raise DataError(
            f"{output} is not complete: task(s) {', '.join(map(str, missing))} of {n} have not finished (no "
            f"{PARTS}/{part_name(missing[0], n)}); run them again with --task-index K --num-tasks {n} (a SLURM array "
            f"of one: sbatch --array=K slurm/prepare.sh ... --num-tasks {n}), then finalize"
        )
    return n, [json.loads(storage.read_text(storage.join(output, PARTS, part_name(k, n)))) for k in range(n)]


def check_settings(output: str, parts: list[dict], expect: dict[str, Any]) -> dict:
    """The parts' one set of settings; any of ``expect`` (finalize's repeated arguments) must match it."""
    settings = parts[0]["settings"]
    for part in parts[1:]:
        if part["settings"] != settings:
            changed = changed_inputs(settings, part["settings"])
            if changed:
                raise DataError(
                    f"the inputs changed between the tasks' runs at {output}: {changed} (task 0's vs task "
                    f"{part['task']}'s); units are byte ranges of the inputs, so run every task again with the "
                    "inputs as they are now"
                )
            diff = next(k for k in {**settings, **part["settings"]} if part["settings"].get(k) != settings.get(k))
            raise DataError(
                f"the parts at {output} disagree: task {part['task']} ran with {FLAGS.get(diff, diff)} "
                f"{part['settings'].get(diff)!r}, task 0 with {settings[diff]!r}; re-run the odd task with the "
                "others' arguments"
            )
    if "sizes" in expect and settings.get("files") == expect.get("files"):
        changed = changed_inputs(settings, expect)
        if changed:
            raise DataError(
                f"the inputs changed since the tasks at {output} ran: {changed} (the tasks' vs now); units are byte "
                "ranges of the inputs, so run every task again with the inputs as they are now"
            )
    for key, value in expect.items():
        if settings.get(key) != value:
            raise DataError(
                f"the parts at {output} were prepared with {FLAGS.get(key, key)} {settings.get(key)!r}, not "
                f"{value!r}; finalize with the tasks' arguments (or none)"
            )
    return settings


def _size(size: int | list[int]) -> int:
    return sum(size) if isinstance(size, list) else size  # a Parquet file's: its row groups'


def changed_inputs(a: dict, b: dict) -> str:
    """The inputs whose sizes differ between two settings of the same files ("" if none), for the messages."""
    if a.get("files") != b.get("files") or a.get("sizes") == b.get("sizes"):
        return ""
    sizes_a, sizes_b = a.get("sizes") or [None] * len(a["files"]), b.get("sizes") or [None] * len(b["files"])
    return ", ".join(
        f"{f} ({'?' if x is None else f'{_size(x):,}'} vs {'?' if y is None else f'{_size(y):,}'} bytes)"
        for f, x, y in zip(a["files"], sizes_a, sizes_b)
        if x != y
    )


def _shards(results: list[dict], split: str) -> list[ShardInfo]:
    return [
        ShardInfo(s["name"], s["samples"], s["bytes"], [BlockInfo(*b) for b in s["blocks"]])
        for r in results
        for s in r[split]["shards"]
    ]


def _manifest(settings: dict, results: list[dict], split: str, prefix: str, created: str) -> Manifest:
    shards = _shards(results, split)
    return Manifest(
        seq_len=settings["seq_len"],
        vocab_size=settings["vocab_size"],
        dtype=settings["dtype"],
        special_ids=settings["special_ids"],
        tokenizer_sha256=settings["tokenizer_sha256"],
        lowercase=settings["lowercase"],
        normalization=settings.get("normalization", ""),
        seed=settings["seed"],
        num_samples=sum(s.samples for s in shards),
        num_tokens=sum(r[split]["tokens"] for r in results),
        samples_per_block=settings["samples_per_block"],
        shards=shards,
        created=created,
        format=FORMAT,
        prefix=prefix,
    )


def finalize(output: str, expect: dict[str, Any] | None = None, say=None) -> Manifest:
    """Merge the parts under ``output`` into its manifest.json (the held-out set's first), each one atomic
    write; refuse while a part is missing. Running it again, or by two tasks at once, writes the same."""
    num_tasks, parts = read_parts(output)
    settings = check_settings(output, parts, expect or {})
    results = sorted((r for p in parts for r in p["units"]), key=lambda r: r["unit"])
    if [r["unit"] for r in results] != list(range(settings["num_units"])):
        raise DataError(f"the parts at {output} do not cover its {settings['num_units']} units; re-run the tasks")
    created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    train = _manifest(settings, results, "train", output, created)
    if train.num_samples == 0:
        raise DataError(f"inputs {settings['files']} produced no examples (are they empty?)")
    eval_output = settings["eval_output"]
    held = _manifest(settings, results, "eval", eval_output, created) if eval_output else None
    if held is not None:
        if held.num_samples == 0:
            raise DataError(
                f"--eval-fraction {settings['eval_fraction']} held out none of the documents of {settings['files']}; "
                "raise it, or leave it out for no held-out set"
            )
        storage.write_text(storage.join(eval_output, MANIFEST), held.to_json())
    storage.write_text(storage.join(output, MANIFEST), train.to_json())
    if say is not None:
        docs = sum(r["documents"] for r in results)
        held_docs = sum(r["held_out_documents"] for r in results)
        say(
            f"finalized {output}: {docs:,} documents, {train.num_samples:,} examples, {train.num_tokens:,} tokens "
            f"in {len(train.shards)} shards from {len(results)} units"
            + (
                f"; held out {held_docs:,} documents ({held_docs / max(1, docs):.2%}), {held.num_samples:,} "
                f"examples, {held.num_tokens:,} tokens at {eval_output}"
                if held is not None
                else ""
            )
        )
        say("task seconds: " + ", ".join(f"{p['task']}: {p['seconds']:.1f}" for p in parts))
    return train


def unit_result(unit: int, sha: str, documents: int, held_docs: int, writers: dict) -> dict:
    """What a unit's marker records: its shards (with their blocks) and counts per split."""
    out: dict[str, Any] = {"unit": unit, "settings_sha256": sha, "documents": documents}
    out["held_out_documents"] = held_docs
    for split, w in writers.items():
        shards = [asdict(s) for s in (w.shards if w is not None else [])]
        for s in shards:
            s["blocks"] = [[b["offset"], b["length"], b["samples"], b["crc32"]] for b in s["blocks"]]
        out[split] = {"shards": shards, "tokens": w.num_tokens if w is not None else 0}
    return out


def finished_with(output: str, settings: dict) -> bool:
    """Whether ``output`` is a split set finalized from parts of exactly ``settings`` (a task started again
    after the set was finalized, as a re-applied Kubernetes Job's pods are)."""
    if not storage.exists(storage.join(output, MANIFEST)):
        return False
    names = [n for n in storage.list_files(storage.join(output, PARTS)) if n.startswith("part-")]
    sha = settings_sha(settings)
    return bool(names) and all(
        settings_sha(json.loads(storage.read_text(storage.join(output, PARTS, n)))["settings"]) == sha for n in names
    )


def already_final(output: str) -> Manifest | None:
    return load_manifest(output) if storage.exists(storage.join(output, MANIFEST)) else None
