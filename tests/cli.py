"""Runs of the real ``electra-scale`` CLI for the tests, each in a process of its own, started cheaply.

A run here is what a user's is: ``electra_scale.cli.main`` in a new process, with its launcher's environment, its
own stdout and stderr, its signals and its exit status; N ranks are N such processes that meet over gloo. Only
the start differs. ``python -m electra_scale`` spends about 11 CPU-seconds importing torch, transformers and
DeepSpeed before its first step, and the suite starts some two hundred of them on 2 cores. Here each process
is forked from one that has imported those modules and run nothing else (multiprocessing's forkserver with
preloaded modules), so a tiny run costs about 3 CPU-seconds instead of 15.

Several ranks get the variables torchrun gives its workers (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
GROUP_RANK, MASTER_ADDR, MASTER_PORT). The launchers themselves are tested where they are the subject, with
real processes: torchrun (a Kubernetes pod's spawn, through ``launch.cli_command`` as the demo and compare use
it), mpirun and srun-like tasks in test_train, sbatch in test_slurm; and the tools (compare, the soak) start
their runs with real subprocesses.

``ELECTRA_TESTS_FRESH_PROCESSES=1`` starts every run as ``python -m electra_scale`` (under torchrun for several
ranks) instead; so does any accelerator but the CPU, since CUDA must not be initialised in a process that forks.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from multiprocessing import forkserver
from pathlib import Path
from unittest import mock

from electra_scale.infra.launch import cli_command, free_port

ROOT = Path(__file__).resolve().parent.parent
# How long a test waits for a run (or for it to get going) before calling it hung: a deadline, not a speed check.
# Generous, so that a loaded machine (two test files at once, or stress-ng) makes a test slower, never fail.
PATIENCE = 900

# What `electra-scale pretrain` and `finetune` import on their way to the first step. A name that fails to import
# is skipped by the forkserver, and the run then imports it itself: slower, never wrong.
PRELOAD = [
    "electra_scale.cli",
    "electra_scale.engine.train",
    "electra_scale.eval.finetune",
    # DeepSpeed imports these inside deepspeed.initialize(): its ZeRO optimizer check imports the Muon optimizer,
    # whose module-level torch.compile costs ~1.4 CPU-s.
    "deepspeed.runtime.zero.muon.muon_optimizer",
    "torch.utils.tensorboard",
    "boto3",
]


def _forked() -> bool:
    return os.environ.get("ELECTRA_TESTS_FRESH_PROCESSES") != "1" and os.environ.get("DS_ACCELERATOR") == "cpu"


_started = threading.Lock()


def _context():
    """The forkserver context, its server started once per test process with one thread per op (libgomp reads
    OMP_NUM_THREADS once, when torch loads, so every run sees the server's)."""
    ctx = multiprocessing.get_context("forkserver")
    with _started:
        if not getattr(_context, "ready", False):
            ctx.set_forkserver_preload(PRELOAD)
            with mock.patch.dict(os.environ, {"OMP_NUM_THREADS": "1"}):
                forkserver.ensure_running()
            _context.ready = True
    return ctx


def _child(argv: list[str], env: dict, stdout: str, stderr: str, unimportable: tuple[str, ...]) -> None:
    """One CLI process, from the forkserver: the environment, streams and argv of `python -m electra_scale
    ARGV`, then main(), then what the interpreter does at exit (join threads, atexit, flush)."""
    os.chdir(ROOT)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(target, fd)
        os.close(target)
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import torch

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    for name in unimportable:  # how Python marks a module that cannot be imported, as on a machine without it
        sys.modules[name] = None
    sys.argv = [str(ROOT / "electra_scale" / "__main__.py"), *argv]  # the CLI re-executes sys.argv[1:] in a pod
    code = 1
    try:
        from electra_scale.cli import main

        code = main(argv)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (stop.code is not None)
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        threading._shutdown()  # noqa: SLF001 - the interpreter's own exit sequence
        atexit._run_exitfuncs()  # noqa: SLF001
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code or 0)


class Run:
    """The processes of one run (one per rank), Popen-like: poll, wait, communicate, send_signal, kill.
    ``returncode`` is the first non-zero exit status in rank order (torchrun would say 1), else 0."""

    def __init__(self, procs: list, stdout: Path, stderr: Path, cleanup: tempfile.TemporaryDirectory):
        self.procs, self.stdout_path, self.stderr_path, self._cleanup = procs, stdout, stderr, cleanup

    @property
    def pid(self) -> int:
        return self.procs[0].pid

    @property
    def returncodes(self) -> list[int | None]:
        return [p.exitcode if isinstance(p, multiprocessing.process.BaseProcess) else p.poll() for p in self.procs]

    @property
    def returncode(self) -> int | None:
        codes = self.returncodes
        if any(c is None for c in codes):
            return None
        return next((c for c in codes if c != 0), 0)

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        for p in self.procs:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if isinstance(p, multiprocessing.process.BaseProcess):
                p.join(left)
                if p.exitcode is None:
                    raise subprocess.TimeoutExpired(f"electra-scale (pid {p.pid})", timeout)
            else:
                p.wait(left)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return self.stdout_path.read_text(errors="replace"), self.stderr_path.read_text(errors="replace")

    def send_signal(self, signum: int) -> None:
        for proc, code in zip(self.procs, self.returncodes):
            if code is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
        with contextlib.suppress(Exception):
            self.wait(PATIENCE)

    def close(self) -> None:
        self._cleanup.cleanup()


def start_cli(
    args: list[str],
    ranks: int = 1,
    env: dict | None = None,
    stderr: Path | str | None = None,
    unimportable: tuple[str, ...] = (),
) -> Run:
    """Start ``electra-scale ARGS`` on ``ranks`` local ranks; stderr to the given file (else a temporary one).
    ``unimportable``: modules the run cannot import (a package missing from the machine)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    scratch = tempfile.TemporaryDirectory(prefix="electra-cli-")
    out = Path(scratch.name) / "stdout"
    err = Path(stderr) if stderr is not None else Path(scratch.name) / "stderr"
    for path in (out, err):
        path.write_text("")
    if not _forked():  # as the demo and compare start runs: python -m torch.distributed.run for several ranks
        cmd = cli_command(args, ranks)
        if unimportable:  # python -c: mark the modules, then what python -m electra_scale runs
            assert ranks == 1, "unimportable= takes one rank"
            code = f"import sys; sys.modules.update(dict.fromkeys({list(unimportable)!r})); "
            code += "from electra_scale.cli import main; sys.exit(main())"
            cmd = [sys.executable, "-c", code, *args]
        with open(out, "a") as o, open(err, "a") as e:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=o, stderr=e)
        return Run([proc], out, err, scratch)
    ctx = _context()
    rank_envs = [full_env]
    if ranks > 1:
        world = {"WORLD_SIZE": str(ranks), "LOCAL_WORLD_SIZE": str(ranks), "GROUP_RANK": "0"}
        world |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
        rank_envs = [{**full_env, **world, "RANK": str(r), "LOCAL_RANK": str(r)} for r in range(ranks)]
    procs = []
    for rank_env in rank_envs:
        proc = ctx.Process(target=_child, args=(list(args), rank_env, str(out), str(err), unimportable))
        proc.start()
        procs.append(proc)
    return Run(procs, out, err, scratch)


def run_cli(
    args: list[str],
    ranks: int = 1,
    env: dict | None = None,
    check: bool = True,
    unimportable: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """Run ``electra-scale ARGS`` to its end: its exit status, stdout and stderr (all ranks'). ``check``: a
    non-zero exit fails the test with the end of stderr."""
    run = start_cli(args, ranks, env, unimportable=unimportable)
    try:
        stdout, stderr = run.communicate(timeout=PATIENCE)
    except subprocess.TimeoutExpired:
        run.kill()
        raise
    finally:
        run.close()
    if check and run.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({run.returncodes}):\n{stderr[-4000:]}")
    return subprocess.CompletedProcess(args, run.returncode, stdout, stderr)
