"""``electra-scale prepare``'s arguments, and which of its three steps a command line runs: the vocabulary
(``--tokenizer-only``), a task (all of it, or task K of N of a SLURM array or Kubernetes Indexed Job), or
``--finalize``. Importing it stays cheap: the CLI parser imports it."""

from __future__ import annotations

import argparse
import os

from electra_scale.data.shards import DataError
from electra_scale.data.units import CHUNK_BYTES

# Defaults of the arguments a --finalize may repeat: None on the command line means "not given".
DEFAULTS = {"seq_len": 128, "seed": 12345, "text_column": "text", "eval_fraction": 0.0, "chunk_bytes": CHUNK_BYTES}


def add_arguments(pr: argparse.ArgumentParser) -> None:
    pr.add_argument(
        "--input",
        nargs="+",
        help=".txt / .jsonl / .gz / .parquet files, directories of them, or datasets save_to_disk directories; "
        "local or s3://",
    )
    pr.add_argument(
        "--text-column", default=None, help="the column (.parquet, save_to_disk) or field (.jsonl) holding the text"
    )
    pr.add_argument("--output", required=True, help="output dir or s3://bucket/prefix")
    pr.add_argument(
        "--tokenizer",
        help="vocab.txt, tokenizer.json, a Hugging Face model directory (its vocab, or its SentencePiece model), or "
        "a vocabulary trained on the input: train:VOCAB_SIZE (WordPiece), train-unigram:VOCAB_SIZE (SentencePiece "
        "Unigram) or train-bpe:VOCAB_SIZE (byte-level BPE); see docs/languages.md",
    )
    pr.add_argument("--seq-len", type=int, default=None, help="default 128")
    pr.add_argument("--samples-per-shard", type=int, default=None, help="default: 64 blocks per shard")
    pr.add_argument(
        "--samples-per-block", type=int, default=None, help="examples per block, the unit of a GET (default: ~1 MiB)"
    )
    pr.add_argument("--seed", type=int, default=None, help="default 12345")
    pr.add_argument(
        "--eval-fraction",
        type=float,
        default=None,
        help="hold out this share of the documents (chosen by a hash of each) as a shard set for eval.shards",
    )
    pr.add_argument("--eval-out", default=None, help="where the held-out set goes (default: OUTPUT/eval)")
    pr.add_argument("--cased", action="store_true", help="keep case (default: lowercase, as uncased BERT)")
    pr.add_argument(
        "--normalization",
        choices=("bert", "nfkc", "nfc", "none"),
        default=None,
        help="Unicode normalisation of a trained vocabulary or a vocab.txt (default: bert for WordPiece, which strips "
        "accents when lowercasing; nfkc for train-unigram/train-bpe); recorded in the manifest",
    )
    pr.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes writing units (default: the cores this process may use); 1: one process, no pool",
    )
    pr.add_argument(
        "--task-index",
        type=int,
        default=None,
        help="this task's index K of --num-tasks N (default: SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN, or the "
        "absolute SLURM_ARRAY_TASK_ID when --num-tasks is given; else JOB_COMPLETION_INDEX)",
    )
    pr.add_argument(
        "--num-tasks",
        type=int,
        default=None,
        help="tasks the prepare is split into (default: SLURM_ARRAY_TASK_COUNT, else ELECTRA_PREPARE_NUM_TASKS)",
    )
    pr.add_argument(
        "--finalize",
        action="store_true",
        help="merge the tasks' parts under --output into its manifest.json (other arguments: checked against theirs)",
    )
    pr.add_argument(
        "--chunk-bytes",
        type=int,
        default=None,
        help=f"input bytes per work unit (default {CHUNK_BYTES >> 20} MiB); fixes the shards, whatever the split",
    )
    pr.add_argument(
        "--tokenizer-only",
        action="store_true",
        help="learn the vocabulary (--tokenizer train:V) from a sample, write OUTPUT/tokenizer.json, and stop",
    )
    pr.add_argument(
        "--tokenizer-sample", default="1GB", help="text a trained vocabulary learns from, spread over the inputs"
    )


def usable_cores() -> int:
    """The cores this process may run on: its affinity mask (set by SLURM's and cgroups' cpusets), where the OS
    has one."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def task_of(args, env=os.environ) -> tuple[int, int]:
    """(K, N): the flags, else a SLURM array task's variables, else a Kubernetes Indexed Job pod's, else (0, 1).

    With neither flag, a SLURM array is the whole prepare: task ID - MIN of COUNT. With ``--num-tasks N`` alone,
    K is the absolute array index (or the pod's index), so ``sbatch --array=K ... --num-tasks N`` re-runs task
    K of N alone: an array of one is not "task 0 of 1"."""
    k, n = args.task_index, args.num_tasks
    if k is None and n is None:
        if "SLURM_ARRAY_TASK_ID" in env:
            first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
            k = int(env["SLURM_ARRAY_TASK_ID"]) - first
            n = int(env["SLURM_ARRAY_TASK_COUNT"]) if "SLURM_ARRAY_TASK_COUNT" in env else None
        elif "JOB_COMPLETION_INDEX" in env:
            k = int(env["JOB_COMPLETION_INDEX"])
            count = env.get("ELECTRA_PREPARE_NUM_TASKS")
            n = int(count) if count else None
            if n is None:
                raise DataError(
                    f"JOB_COMPLETION_INDEX is {k} but ELECTRA_PREPARE_NUM_TASKS is not set: set it next to the "
                    "Indexed Job's completions, or pass --num-tasks N"
                )
    elif k is None:
        index = env.get("SLURM_ARRAY_TASK_ID", env.get("JOB_COMPLETION_INDEX"))
        k = int(index) if index is not None else None
    if k is None and n is None:
        return 0, 1
    if n is None:
        raise DataError(f"task index {k} without a task count: pass --num-tasks N (or SLURM_ARRAY_TASK_COUNT)")
    if k is None:
        if n != 1:
            raise DataError(
                f"--num-tasks {n} without a task index: pass --task-index K (0 to {n - 1}), or run it as array "
                f"task K (sbatch --array=K)"
            )
        k = 0
    if n < 1 or not 0 <= k < n:
        raise DataError(f"task index {k} is not one of the {n} tasks (0 to {n - 1}); check --task-index/--num-tasks")
    return k, n


def _value(args, name: str):
    v = getattr(args, name)
    return DEFAULTS[name] if v is None else v


def _finalize(args) -> int:
    from electra_scale.data import parts
    from electra_scale.data.tokenizer import load_tokenizer, resolve_spec, tokenizer_sha256
    from electra_scale.data.units import input_sizes, resolve_inputs

    expect = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k) is not None}
    if args.input:
        expect["files"] = resolve_inputs(args.input, _value(args, "text_column"))
        expect["sizes"] = input_sizes(expect["files"])
    if args.samples_per_shard is not None:
        expect["samples_per_shard"] = args.samples_per_shard
    if args.samples_per_block is not None:
        expect["samples_per_block"] = args.samples_per_block
    if args.cased:
        expect["lowercase"] = False
    if args.tokenizer:
        spec, lowercase = resolve_spec(args.tokenizer, not args.cased)
        if not spec.startswith("train"):
            expect["tokenizer_sha256"] = tokenizer_sha256(load_tokenizer(spec, lowercase=lowercase))
    done = parts.already_final(args.output)
    if done is not None and not parts.is_unfinalized(args.output):
        print(f"{args.output} is already finalized: {done.num_samples:,} examples in {len(done.shards)} shards")
        return 0
    parts.finalize(args.output, expect, say=print)
    return 0


def check_numbers(args) -> None:
    """The numeric arguments, refused in one line before any work (prepare's own checks would raise deep inside)."""
    seq_len = _value(args, "seq_len")
    if seq_len < 8:
        raise DataError(f"--seq-len {seq_len} is too short: an example needs at least 8 tokens (default 128)")
    if args.workers is not None and args.workers < 1:
        raise DataError(f"--workers {args.workers} must be at least 1 (1: one process, no pool; default: all cores)")
    sizes = {"--samples-per-shard": args.samples_per_shard, "--samples-per-block": args.samples_per_block}
    for flag, value in {**sizes, "--chunk-bytes": args.chunk_bytes}.items():
        if value is not None and value < 1:
            raise DataError(f"{flag} {value} must be at least 1")


def run(args) -> int:
    from electra_scale.data.vocab import parse_size

    check_numbers(args)
    if args.finalize:
        return _finalize(args)
    missing = [f for f, v in (("--input", args.input), ("--tokenizer", args.tokenizer)) if not v]
    if missing:
        raise DataError(f"prepare needs {' and '.join(missing)} (only --finalize goes without them)")
    sample = parse_size(args.tokenizer_sample)
    if args.tokenizer_only:
        from electra_scale.data.vocab import prepare_vocabulary

        prepare_vocabulary(
            args.input,
            args.output,
            args.tokenizer,
            lowercase=not args.cased,
            sample_bytes=sample,
            text_column=_value(args, "text_column"),
            eval_fraction=_value(args, "eval_fraction"),
            chunk_bytes=_value(args, "chunk_bytes"),
            say=print,
            normalization=args.normalization,
        )
        return 0
    from electra_scale.data.prepare import prepare

    task, num_tasks = task_of(args)
    prepare(
        args.input,
        args.output,
        args.tokenizer,
        seq_len=_value(args, "seq_len"),
        samples_per_shard=args.samples_per_shard,
        samples_per_block=args.samples_per_block,
        seed=_value(args, "seed"),
        lowercase=not args.cased,
        text_column=_value(args, "text_column"),
        eval_fraction=_value(args, "eval_fraction"),
        eval_output=args.eval_out,
        workers=args.workers or usable_cores(),
        task_index=task,
        num_tasks=num_tasks,
        chunk_bytes=_value(args, "chunk_bytes"),
        tokenizer_sample=sample,
        say=print,
        normalization=args.normalization,
    )
    return 0
