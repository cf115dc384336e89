"""``electra-scale <command>``: argument parsing only; each command lives in its own module."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
import warnings

EXIT_CONFIG = 2  # bad config or bad input: fix and re-run; do not retry as-is
EXIT_FAILURE = 1


def _setup_logging() -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s [rank {rank}] %(message)s"
        if os.environ.get("WORLD_SIZE", "1") != "1"
        else "%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # torch.distributed under ZeRO repeats the same FutureWarning hundreds of times; DeepSpeed is chatty.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    if "DS_ACCELERATOR" not in os.environ:  # asking torch costs its import (~2 s), which describe, plot... skip
        os.environ["DS_ACCELERATOR"] = "cuda" if _has_cuda() else "cpu"
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "botocore", "boto3"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="electra-scale", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("prepare", help="text -> tokenized, packed webdataset shards (local dir or s3://)")
    from electra_scale.data.prepare_cli import add_arguments as add_prepare_arguments

    add_prepare_arguments(pr)

    pt = sub.add_parser("pretrain", help="pretrain with DeepSpeed (run under torchrun/deepspeed for >1 rank)")
    pt.add_argument("--config", required=True, action="append", help="YAML; repeat to layer files (later wins)")
    pt.add_argument("overrides", nargs="*", metavar="key=value")
    pt.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher

    de = sub.add_parser("describe", help="parameter counts, FLOPs per token and the resolved DeepSpeed config")
    de.add_argument("--config", required=True, action="append", help="YAML; repeat to layer files (later wins)")
    de.add_argument("overrides", nargs="*", metavar="key=value")
    de.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")))
    de.add_argument("--json", action="store_true")

    ex = sub.add_parser("export", help="checkpoint -> Hugging Face discriminator and generator (safetensors)")
    ex.add_argument("checkpoint", help="run output dir, or one checkpoint dir (local or s3://)")
    ex.add_argument("outdir")

    dm = sub.add_parser("demo", help="the end-to-end CPU demo: corpus -> S3 shards -> pretrain -> resume -> export")
    dm.add_argument("--workdir", default="demo-output")
    dm.add_argument("--steps", type=int, default=300)
    dm.add_argument("overrides", nargs="*", metavar="key=value", help="pretraining overrides, e.g. optim.lr=5e-4")

    # Commands with many options keep them next to their code: each module has add_arguments(parser) and
    # run(args) -> exit code. Importing them must stay cheap (no torch at module level).
    for name, module, help_text in MODULE_COMMANDS:
        importlib.import_module(module).add_arguments(sub.add_parser(name, help=help_text))
    return p


MODULE_COMMANDS: list[tuple[str, str, str]] = [
    # (command, module, help)
    (
        "plot",
        "electra_scale.tools.plot",
        "PNG curves from runs' metrics.jsonl (loss, accuracy, disc P/R, tokens/s, lr)",
    ),
    (
        "bench",
        "electra_scale.tools.bench",
        "step time, tokens/s, MFU, framework overhead, memory and data-path throughput",
    ),
    ("finetune", "electra_scale.eval.finetune", "fine-tune a discriminator (or random init) on a GLUE/CSV/JSONL task"),
    ("compare", "electra_scale.tools.compare", "ELECTRA vs MLM at equal pretraining FLOPs, scored downstream"),
    ("convert-shards", "electra_scale.data.convert", "an electra-scale-shards/1 set -> the current block format"),
]


def _describe(args) -> int:
    from electra_scale.config import deepspeed_config
    from electra_scale.engine.model import flops_per_token, paper_flops_per_token, param_counts
    from electra_scale.engine.run_config import load_run_config

    cfg = load_run_config(args.config, args.overrides)
    info = {
        **param_counts(cfg),
        "flops_per_token": flops_per_token(cfg),
        "paper_flops_per_token": paper_flops_per_token(cfg),
    }
    info["deepspeed_config"] = deepspeed_config(cfg, args.world_size)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"config                {' + '.join(args.config)}  (objective: {cfg.objective.kind})")
    print(f"discriminator params  {info['discriminator_params']:,}")
    print(f"generator params      {info['generator_params']:,}")
    print(f"total unique params   {info['total_params']:,}  (shared embeddings counted once)")
    tokens = cfg.train.max_steps * cfg.train.global_batch_size * cfg.data.seq_len
    print(f"train FLOPs / token   {info['flops_per_token']:.4g}  (matmuls, backward = 2x forward: MFU's)")
    print(f"  paper convention    {info['paper_flops_per_token']:.4g}  (every op, dense lookups, backward = forward)")
    print(f"train FLOPs / run     {info['flops_per_token'] * tokens:.4g}  ({tokens:.3g} tokens)")
    print(f"  paper convention    {info['paper_flops_per_token'] * tokens:.4g}  (the ELECTRA paper's FLOP axis)")
    print(f"DeepSpeed config (world size {args.world_size}):")
    print(json.dumps(info["deepspeed_config"], indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv)[:1] == ["pretrain"]:
        # Before any heavy import: a SIGUSR1/SIGTERM from now on waits until the run can handle it
        # (engine/early_stop.py: the scheduler's signal may come while torch and DeepSpeed still load).
        from electra_scale.engine import early_stop

        early_stop.hold()
    args = _parser().parse_args(argv)
    if args.command == "prepare":  # no torch (which the engine's modules import): prepare runs on CPU nodes
        return _prepare(args)
    _setup_logging()
    from electra_scale.config import ConfigError
    from electra_scale.data.shards import DataError
    from electra_scale.engine.checkpoint import CheckpointError, NoCheckpointError
    from electra_scale.infra.launch import LaunchError
    from electra_scale.infra.storage import StorageError

    try:
        if args.command == "pretrain":
            from electra_scale.engine.run_config import load_run_config
            from electra_scale.engine.train import pretrain
            from electra_scale.infra import launch

            cfg = load_run_config(args.config, args.overrides)  # a bad config fails here, before any spawn
            from electra_scale.engine.train import EXIT_PREEMPTED

            spawn = launch.node_spawn_command(launch.detect(), sys.argv[1:])
            if spawn:  # a Kubernetes pod running one process per GPU supervises torchrun
                from electra_scale.engine import early_stop

                early = early_stop.take()  # run_node forwards the signals to the ranks from here on
                if early is not None:  # no rank has started: nothing to save, and nothing to stop but this
                    name = signal.Signals(early).name
                    print(f"electra-scale pretrain: {name} before the ranks started; exit 75", file=sys.stderr)
                    return EXIT_PREEMPTED
                return launch.run_node(spawn, EXIT_PREEMPTED)
            try:
                result = pretrain(cfg)
            finally:
                from electra_scale.engine import watchdog

                watchdog.close_all()  # an error ends the run: it is reported, not turned into a restart
                _destroy_process_group()
            if result["preempted"]:
                launch.mark_preempted()
                return EXIT_PREEMPTED
        elif args.command == "describe":
            return _describe(args)
        elif args.command == "export":
            from electra_scale.engine.export import export

            for name, where in export(args.checkpoint, args.outdir).items():
                print(f"{name}: {where}")
        elif args.command == "demo":
            from electra_scale.tools.demo import run_demo

            run_demo(args.workdir, steps=args.steps, overrides=args.overrides)
        else:
            module = dict((name, mod) for name, mod, _ in MODULE_COMMANDS)[args.command]
            return importlib.import_module(module).run(args)
    except (ConfigError, DataError, LaunchError, NoCheckpointError) as err:
        print(f"electra-scale {args.command}: error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except (StorageError, CheckpointError) as err:
        print(f"electra-scale {args.command}: error: {err}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def _prepare(args) -> int:
    from electra_scale.data.prepare_cli import run
    from electra_scale.data.shards import DataError
    from electra_scale.infra.storage import StorageError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    for name in ("botocore", "boto3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return run(args)
    except DataError as err:
        print(f"electra-scale prepare: error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except StorageError as err:
        print(f"electra-scale prepare: error: {err}", file=sys.stderr)
        return EXIT_FAILURE


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
