"""The soak: one run of the tiny preset through many faults at once, then the proof that nothing was lost.

    scripts/soak.sh [--kills 10] [--steps 400] [--seed 0] [--world-sizes 2,1,4,2] [--partitions 4] ...

What it does (docs/faults.md, "Soak"):

1. starts a SeaweedFS (electra_scale/infra/s3server.py; or uses the S3 of the environment with --bucket), puts
   the shards there (prepared from tests/corpus.py's corpus, or --shards), and trains an uninterrupted
   reference run straight from the server;
2. trains the same run again, with every request of every rank going through tests/faultproxy.py, which resets
   connections, answers 503 SlowDown and truncates bodies at the rates given, and counts what it injected;
3. kills the run with SIGKILL (launcher and ranks at once) ``--kills`` times, at seeded moments of four kinds in
   turn: during a checkpoint's upload (at a drawn write request of the attempt's second checkpoint, seen by the
   proxy, before it goes on), a drawn number of steps into the attempt, while the attempt resumes (at a
   drawn checkpoint download, plus a drawn delay: downloading, verifying, converting, loading), and a "freeze":
   a drawn rank stopped with SIGSTOP a drawn number of steps in, which the other ranks' watchdogs must notice
   (run.timeouts.step_s = ``--step-timeout``) and end with exit 75, the launcher then tearing the attempt down
   (on one rank, with no peer to notice, a freeze is a step kill); then restarts it on the next world size of
   ``--world-sizes``, the data's partition count fixed by data.partitions, and measures each restart's latency:
   from the failure (the kill, or the freeze) to the restarted attempt's first step, split into the parts its
   ``startup:`` line gives (engine/startup.py);
4. checks: every checkpoint ever marked COMPLETE in the bucket is whole (sizes, sha256) and loads, and every
   restart resumed from one of those; each step was trained once, on the reference's examples (so every example
   once an epoch); the losses equal the reference's within the tolerance of another world size; the prefix
   holds the last checkpoint.keep_last checkpoints and nothing else.

It prints a table, and as its last line a JSON object with ``kills``, ``faults``, ``lost`` and ``duplicated``;
the exit code is 1 if a check failed (2 for bad arguments). Dropout is off (model.dropout=0): a restart on
another world size cannot restore the per-rank dropout RNG, so only then do the losses continue exactly.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests/: the fault proxy and the corpus

import torch  # noqa: E402

from electra_scale.data import load_manifest  # noqa: E402
from electra_scale.data.stream import StreamLayout  # noqa: E402
from electra_scale.engine.checkpoint import MARKER, UNIVERSAL, fetch_and_verify, step_of, tag_for  # noqa: E402
from electra_scale.engine.metrics import read_metrics, read_samples  # noqa: E402
from electra_scale.infra import storage  # noqa: E402
from electra_scale.infra.launch import cli_command  # noqa: E402
from electra_scale.infra.s3server import SeaweedS3  # noqa: E402
from tests.corpus import prepare_shards, write_corpus  # noqa: E402
from tests.faultproxy import FaultProxy, Request  # noqa: E402

# Retries fast and many: a fault costs tens of milliseconds, and 10 failures in a row of one request (the budget)
# at a few per cent a fault does not happen. Timeouts stay long: a loaded machine is not a fault.
RETRIES = {
    "ELECTRA_S3_MAX_ATTEMPTS": "10",
    "ELECTRA_S3_BACKOFF_BASE": "0.02",
    "ELECTRA_S3_BACKOFF_MAX": "0.2",
    "ELECTRA_S3_READ_TIMEOUT": "60",
}
# How long one attempt may take before the soak calls it hung: a deadline, not a speed check.
PATIENCE = 1800
# Another world size sums the same gradients in another order (tests/test_resilience.py's tolerance).
LOSS_REL = 1e-4
KINDS = ("upload", "step", "resume", "freeze")  # the kill moments, in turn
FAULT_KINDS = ("reset", "slowdown", "truncate")
_STEP_LINE = re.compile(r"\bstep (\d+)/\d+ \|")
_START = re.compile(r"pretrain electra: steps (\d+) ->")
_RESUMED = re.compile(r"resumed from (\S+)/(step_\d+) at step (\d+)")
_STARTUP = re.compile(r"startup: (.*?); ([\d.]+)s from process start to the first step done")
_WATCHDOG = re.compile(r"watchdog: rank \d+ stuck in .*")


# ------------------------------------------------------------------------------------------------ processes
def kill_9_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once, as a node failure would. torchrun starts each rank
    in a session of its own, so killing the launcher's process group is not enough."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, tree = [pid], []
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def launch(args: list[str], ranks: int, env: dict[str, str], log: Path) -> subprocess.Popen:
    """``electra-scale ARGS`` on ``ranks`` local ranks, exactly as a user starts it; stderr to ``log``."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    with open(log, "w") as err:
        return subprocess.Popen(cli_command(args, ranks), cwd=ROOT, env=full_env, stdout=err, stderr=err)


def rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of ``rank`` among a launcher's descendants (torchrun's workers carry RANK in their environment)."""
    todo = [launcher]
    while todo:
        pid = todo.pop()
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if (
                pid != launcher
                and f"RANK={rank}".encode() in env
                and b"electra_scale" in Path(f"/proc/{pid}/cmdline").read_bytes()
            ):
                return pid
            todo += [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
        except OSError:
            continue
    return None


def logged_steps(log: Path) -> int:
    """Training steps this attempt has logged (rank 0's ``step N/M |`` lines)."""
    return len(_STEP_LINE.findall(log.read_text())) if log.exists() else 0


# ------------------------------------------------------------------------------------------------ one attempt
@dataclass
class Kill:
    attempt: int
    world: int
    kind: str  # upload | step | resume | freeze: the moment drawn
    at: str = ""  # what was going on: the request the proxy held, or the steps and the delay
    last_step: int = 0  # the last step the attempt logged before it died
    when: float = 0.0  # time.time() of the failure (the kill, or the SIGSTOP)
    detected_s: float | None = None  # a freeze: how long until the launcher had ended the attempt
    watchdog: str = ""  # a freeze: the watchdog's line


@dataclass
class Restart:
    attempt: int
    world: int
    since_failure_s: float  # the previous attempt's failure to this attempt's first step done
    parts: str  # the startup line's parts
    process_s: float  # process start to the first step done


class Attempt:
    """One start of the run, and the kill planned for it (None: the last one, which runs to the end)."""

    def __init__(self, soak: Soak, index: int, world: int, kind: str | None, rng: random.Random):
        self.soak, self.index, self.world, self.kind = soak, index, world, kind
        self.log = soak.work / f"attempt{index:02d}-w{world}.log"
        self.proc: subprocess.Popen | None = None
        self.kill: Kill | None = None
        self._lock = threading.Lock()
        every = soak.args.every
        # Drawn now, in order, so that the same seed plans the same kills whatever the timing does.
        self.after_steps = rng.randint(1, 2 * every)  # step: this many steps into the attempt ...
        self.extra = rng.uniform(0.0, 0.3)  # ... plus a part of a step
        # upload: the k-th write of the second checkpoint it saves (the first, if it has one save left), of about
        # 8 + 3 x world: the files (6 + 2 x world), each rank's part list, COMPLETE, latest; then retention's.
        self.write_k = rng.randint(1, 8 + 3 * world)
        self.read_k = rng.randint(1, 8)  # resume: the k-th checkpoint download ...
        self.read_delay = rng.uniform(0.0, 3.0)  # ... plus this long
        self.freeze_rank = rng.randrange(world)  # freeze: this rank, after_steps steps into the attempt
        self.first_step_at: float | None = None  # time.time() when its startup line appeared
        self._frozen: int | None = None
        self._tags: list[str] = []
        self._writes = self._reads = 0
        self._kill_after: float | None = None  # a resume kill: monotonic time it is due

    # Called by the proxy's threads with every request of this attempt, before it goes on.
    def on_request(self, request: Request) -> None:
        ckpts = self.soak.ckpt_path
        if self.kind is None or self.kill is not None or not request.path.startswith(ckpts):
            return
        rest = request.path[len(ckpts) :]
        if self.kind == "upload" and request.method in ("PUT", "POST", "DELETE"):
            tag = rest.split("/")[0].split("?")[0]
            saved = tag.startswith("step_") and not tag.endswith(UNIVERSAL)  # not a converted copy's publication
            if request.method == "PUT" and saved and tag not in self._tags:
                self._tags.append(tag)
            if len(self._tags) >= min(2, self._saves_ahead()):
                self._writes += 1
                if self._writes >= self.write_k:
                    self._kill(
                        f"{request.method} {request.path.split('?')[0].removeprefix(ckpts)} (write {self._writes})"
                    )
        elif self.kind == "resume" and request.method == "GET" and rest.startswith("step_"):
            self._reads += 1
            if self._reads == self.read_k:
                self._kill_after = time.monotonic() + self.read_delay

    def start_step(self) -> int | None:
        m = _START.search(self.log.read_text())
        return int(m.group(1)) if m else None

    def _saves_ahead(self) -> int:
        start, a = self.start_step() or 0, self.soak.args
        return len({a.steps, *range(a.every, a.steps + 1, a.every)} - set(range(start + 1)))

    def _kill(self, at: str) -> None:
        with self._lock:
            if self.kill is not None:
                return
            if self.proc is None:
                return
            kill_9_tree(self.proc.pid)
            self.kill = Kill(self.index, self.world, self.kind, at, self.soak.last_logged(), time.time())

    def _freeze(self, after: int) -> None:
        """SIGSTOP one rank (not the launcher): the others must notice, and the launcher end the attempt."""
        with self._lock:
            if self.kill is not None or self.proc is None:
                return
            pid = rank_pid(self.proc.pid, self.freeze_rank)
            if pid is None:  # not started yet, or gone: try again at the next look
                return
            os.kill(pid, signal.SIGSTOP)
            self._frozen = pid
            at = f"rank {self.freeze_rank} frozen after {after} step(s)"
            self.kill = Kill(self.index, self.world, "freeze", at, self.soak.last_logged(), time.time())

    def run(self) -> int:
        """Start, wait for the planned moment, kill (or let the last attempt finish); the exit code."""
        self.soak.proxy.on_request = self.on_request
        self.proc = launch(self.soak.run_args(self.world), self.world, self.soak.child_env, self.log)
        deadline = time.monotonic() + PATIENCE
        while self.proc.poll() is None and time.monotonic() < deadline:
            start = self.start_step()
            # A kill a few steps in comes before the attempt's last step, so that it cannot end the run first.
            after = None if start is None else min(self.after_steps, max(1, self.soak.args.steps - start - 1))
            if self.first_step_at is None and _STARTUP.search(self.log.read_text()):
                self.first_step_at = time.time()
            freeze = self.kind == "freeze" and self.world > 1  # one rank: no peer to notice; a step kill
            if freeze and after is not None and self.kill is None and logged_steps(self.log) >= after:
                self._freeze(after)
            elif self.kind in ("step", "freeze") and after is not None and logged_steps(self.log) >= after:
                if self.kill is None:
                    time.sleep(self.extra)
                    self._kill(f"after {after} step(s) + {self.extra:.2f}s")
            elif self.kind == "resume":
                if self._kill_after is not None and time.monotonic() >= self._kill_after:
                    self._kill(f"{self.read_delay:.2f}s after checkpoint download {self.read_k}")
                elif self._kill_after is None and logged_steps(self.log) >= 1:
                    self._kill("at its first step (fewer checkpoint downloads than drawn)")
            time.sleep(0.02)
        if self._frozen is not None:
            with contextlib.suppress(ProcessLookupError):  # the launcher killed it; if not, it goes now
                os.kill(self._frozen, signal.SIGKILL)
            if self.proc.poll() is not None:
                self.kill.detected_s = time.time() - self.kill.when
                found = _WATCHDOG.search(self.log.read_text())
                self.kill.watchdog = found.group(0) if found else ""
        if self.proc.poll() is None:  # hung: end it, and say so
            kill_9_tree(self.proc.pid)
            self.proc.wait()
            return -1
        return self.proc.wait()

    def startup(self) -> tuple[str, float] | None:
        m = _STARTUP.search(self.log.read_text())
        return (m.group(1), float(m.group(2))) if m else None

    def resumed(self) -> tuple[str, int] | None:
        m = _RESUMED.search(self.log.read_text())
        return (m.group(2), int(m.group(3))) if m else None


# ------------------------------------------------------------------------------------------------ the soak
@dataclass
class Report:
    kills: list[Kill] = field(default_factory=list)
    restarts: list[Restart] = field(default_factory=list)
    worlds: list[int] = field(default_factory=list)
    resumes: list[str] = field(default_factory=list)  # per attempt: "fresh" or the step it resumed from
    faults: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    lost: int = 0
    duplicated: int = 0
    verified: dict[str, str] = field(default_factory=dict)  # tag -> "" (whole, loads) or the problem
    last_resumed: str | None = None  # the checkpoint the last attempt resumed from
    loss_rel: float = 0.0
    loss_rel_last: float = 0.0
    failures: list[str] = field(default_factory=list)
    wall_s: float = 0.0


class Soak:
    def __init__(self, args: argparse.Namespace, bucket: str, shards: str, vocab: int, work: Path, upstream: str):
        self.args, self.bucket, self.shards, self.vocab, self.work = args, bucket, shards, vocab, work
        self.run = f"{bucket}/run"
        self.cache = work / "cache"  # one node: every attempt stages in (and records samples to) the same place
        self.ckpt_path = "/" + self.run.removeprefix("s3://") + "/checkpoints/"
        self.proxy = FaultProxy(upstream)
        self.child_env = {**RETRIES, "AWS_ENDPOINT_URL": self.proxy.endpoint}
        self.report = Report()
        self.replay_from: str | None = None  # the newest checkpoint copied for the replay

    def run_args(self, world: int, output: str | None = None, cache: Path | None = None) -> list[str]:
        a = self.args
        return [
            "pretrain",
            "--config",
            "configs/tiny.yaml",
            f"data.shards={self.shards}",
            f"run.output_dir={output or self.run}",
            f"run.cache_dir={cache or self.cache}",
            f"model.vocab_size={self.vocab}",
            f"train.max_steps={a.steps}",
            f"train.global_batch_size={a.batch}",
            f"train.micro_batch_size={a.batch // world}",
            "train.log_every=1",
            f"checkpoint.every_steps={a.every}",
            f"checkpoint.keep_last={a.keep}",
            f"run.timeouts.step_s={a.step_timeout}",
            f"data.partitions={a.partitions}",
            "run.record_samples=true",
            "model.dropout=0",
            "model.attention_dropout=0",
        ]

    def last_logged(self) -> int:
        path = self.cache / "metrics.jsonl"
        text = path.read_text() if path.exists() else ""
        lines = text[: text.rfind("\n") + 1].splitlines()  # the last line may be half written
        return json.loads(lines[-1])["step"] if lines else 0

    # -------------------------------------------------------------------------------------------- phases
    def reference(self) -> Path:
        """The uninterrupted run, straight from the server: its metrics and the examples of each step."""
        if self.args.reference:
            return Path(self.args.reference)
        cache = self.work / "reference"
        world = self.args.reference_world or self.args.world_sizes[0]
        log = self.work / "reference.log"
        proc = launch(self.run_args(world, f"{self.bucket}/reference", cache), world, {}, log)
        if proc.wait(timeout=PATIENCE) != 0:
            raise SystemExit(f"soak: the reference run failed:\n{log.read_text()[-3000:]}")
        shutil.copyfile(log, cache / "reference.log")
        storage.download_file(f"{self.bucket}/reference/metrics.jsonl", cache / "metrics.jsonl")
        return cache

    def soak(self) -> None:
        a, rep = self.args, self.report
        rng = random.Random(a.seed)
        self.proxy.at_rates({"reset": a.reset_rate, "slowdown": a.slowdown_rate, "truncate": a.truncate_rate}, a.seed)
        self.proxy.start()
        try:
            for i in range(a.kills + 1):
                kind = KINDS[i % len(KINDS)] if i < a.kills else None
                if kind is None:
                    self.snapshot_for_replay()
                attempt = Attempt(self, i, a.world_sizes[i % len(a.world_sizes)], kind, rng)
                code = attempt.run()
                rep.worlds.append(attempt.world)
                resumed = attempt.resumed()
                began = "fresh" if attempt.start_step() == 0 else "-"
                rep.resumes.append(began if resumed is None else str(resumed[1]))
                rep.last_resumed = None if resumed is None else resumed[0]
                if resumed is not None and rep.verified.get(resumed[0]) != "":
                    rep.failures.append(f"attempt {i} resumed from {resumed[0]}, which was never seen whole")
                if "fails verification" in attempt.log.read_text():
                    rep.failures.append(f"attempt {i} met a checkpoint marked complete that is not whole")
                started = attempt.startup()
                if rep.kills and rep.kills[-1].attempt == i - 1 and started and attempt.first_step_at:
                    since = attempt.first_step_at - rep.kills[-1].when
                    rep.restarts.append(Restart(i, attempt.world, since, started[0], started[1]))
                freeze = attempt.kill is not None and attempt.kill.kind == "freeze"
                if freeze and (not attempt.kill.watchdog or code == 0):
                    rep.failures.append(f"attempt {i}: no watchdog noticed the frozen rank: {attempt.log}")
                if attempt.kill is not None:
                    rep.kills.append(attempt.kill)
                elif kind is not None:  # it ended before its kill
                    why = "finished" if code == 0 else f"exited {code}"
                    rep.failures.append(f"attempt {i} {why} before its kill ({kind}): {attempt.log}")
                    if code == 0:
                        break
                if kind is None and code != 0:
                    rep.failures.append(f"the last attempt exited {code}: {attempt.log}")
                self.verify_complete()  # after every kill, and at the end
                print(
                    f"soak: attempt {i} on {attempt.world} rank(s), from {rep.resumes[-1]}: "
                    + (
                        f"killed ({attempt.kill.kind}: {attempt.kill.at}) at step {attempt.kill.last_step}"
                        if attempt.kill
                        else f"exit {code}"
                    ),
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            self.proxy.on_request = None
            self.proxy.stop()
        rep.faults = {k: self.proxy.count(k) for k in FAULT_KINDS}
        rep.requests = len(self.proxy.requests)

    def snapshot_for_replay(self) -> None:
        """The checkpoints the last attempt may resume from (every complete one, and ``latest``), copied as a run
        of its own: ``replay`` then resumes it by the same rule and trains it on, uninterrupted."""
        remote = f"{self.run}/checkpoints"
        files = storage.list_files(remote)
        complete = {rel.split("/")[0] for rel in files if rel.endswith(f"/{MARKER}")}
        for rel in files:
            if rel.split("/")[0] in complete or rel == "latest":
                storage.write_bytes(f"{self.bucket}/replay/checkpoints/{rel}", storage.read_bytes(f"{remote}/{rel}"))
        saved = [tag for tag in complete if not tag.endswith(UNIVERSAL)]  # (converted copies are copied too)
        self.replay_from = max(saved, key=step_of) if saved else None

    def replay(self) -> list[dict]:
        """The last restart again, from the same checkpoint on the same world size, without faults or kills."""
        if self.replay_from is None or self.report.last_resumed is None:
            return []
        world, log = self.report.worlds[-1], self.work / "replay.log"
        proc = launch(self.run_args(world, f"{self.bucket}/replay", self.work / "replay"), world, {}, log)
        if proc.wait(timeout=PATIENCE) != 0:
            self.report.failures.append(f"the replay of the last restart failed: {log}")
            return []
        resumed = _RESUMED.search(log.read_text())
        if resumed is None or resumed.group(2) != self.report.last_resumed:
            self.report.failures.append(f"the replay resumed from another checkpoint than the last attempt: {log}")
            return []
        return read_metrics(f"{self.bucket}/replay/metrics.jsonl")

    # -------------------------------------------------------------------------------------------- checks
    def verify_complete(self) -> None:
        """Every checkpoint now marked COMPLETE in the bucket: download, check against its marker, load."""
        remote = f"{self.run}/checkpoints"
        for rel in storage.list_files(remote):
            tag, _, name = rel.partition("/")
            if name != MARKER or tag in self.report.verified:
                continue
            scratch = self.work / "verify"
            shutil.rmtree(scratch, ignore_errors=True)
            problem = fetch_and_verify(remote, scratch, tag)
            if problem is None:
                try:
                    for path in (scratch / tag).rglob("*.pt"):
                        torch.load(path, map_location="cpu", weights_only=False)
                    json.loads((scratch / tag / "trainer_state.json").read_text())
                except Exception as err:  # noqa: BLE001 - any failure to load is the finding
                    problem = f"does not load: {err}"
            self.report.verified[tag] = problem or ""
            if problem:
                self.report.failures.append(f"{tag} is marked complete but {problem}")
            shutil.rmtree(scratch, ignore_errors=True)

    def check(self, reference: Path) -> None:
        a, rep = self.args, self.report
        steps = list(range(1, a.steps + 1))
        # Sample accounting: each step recorded once, with the reference's examples (a multiset per step: what is
        # missing was lost, what is extra was trained twice); each stream position once; each whole epoch every
        # example once, plus the fewer than P repeats that pad an epoch.
        records, ref_ex = _step_records(self.cache), read_samples(reference, "samples")
        if sorted(records) != steps:
            rep.failures.append(f"samples recorded for steps {_ranges(sorted(records))}, not 1..{a.steps}")
        for s in steps:
            got, want = collections.Counter(records.get(s, ([], []))[1]), collections.Counter(ref_ex.get(s, []))
            rep.lost += sum((want - got).values())
            rep.duplicated += sum((got - want).values())
        if rep.lost or rep.duplicated:
            rep.failures.append(f"{rep.lost} example(s) lost and {rep.duplicated} duplicated against the reference")
        positions = sorted(p for pos, _ in records.values() for p in pos)
        if positions != list(range(a.steps * a.batch)):
            rep.failures.append("stream positions skipped or trained twice")
        manifest = load_manifest(self.shards)
        epoch = StreamLayout(manifest, 12345, a.partitions).epoch_size  # the tiny preset's train.seed
        per_epoch: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
        for pos, examples in records.values():
            for p, x in zip(pos, examples, strict=True):
                per_epoch[p // epoch][x] += 1
        pads = epoch - manifest.num_samples
        for e in range(a.steps * a.batch // epoch):
            counts = per_epoch[e]
            if sorted(counts) != list(range(manifest.num_samples)) or sum(counts.values()) != epoch:
                rep.failures.append(f"epoch {e} did not train every example once (plus {pads} pads)")

        # Losses. After the last restart: those of the same restart replayed without faults or kills (same
        # checkpoint, same world size), within another world size's tolerance (in practice equal to the bit). Against
        # the uninterrupted run from step 0 only reported: the world sizes' different summation orders (1e-7 apart
        # at first) grow chaotically over hundreds of steps (docs/faults.md: Soak).
        ref, got = read_metrics(str(reference / "metrics.jsonl")), read_metrics(f"{self.run}/metrics.jsonl")
        if [m["step"] for m in got] != steps:
            rep.failures.append(f"metrics.jsonl has steps {_ranges([m['step'] for m in got])}, not 1..{a.steps}")
        else:
            rep.loss_rel = max(abs(g["loss"] - r["loss"]) / abs(r["loss"]) for g, r in zip(got, ref, strict=True))
            if any(abs(g["lr"] - r["lr"]) > 1e-9 * abs(r["lr"]) for g, r in zip(got, ref, strict=True)):
                rep.failures.append("the learning rate schedule did not continue where it was")
            last = rep.resumes[-1] if rep.resumes else "fresh"
            replayed = self.replay() if last.isdigit() else []
            by_step = {m["step"]: m for m in got}
            if last.isdigit() and [m["step"] for m in replayed] != steps[int(last) :]:
                rep.failures.append("the replay of the last restart did not log the same steps")
            else:
                rels = [abs(by_step[m["step"]]["loss"] - m["loss"]) / abs(m["loss"]) for m in replayed]
                rep.loss_rel_last = max(rels, default=0.0)
                if rep.loss_rel_last > LOSS_REL:
                    rep.failures.append(
                        f"losses after the last restart differ from its replay by {rep.loss_rel_last:.1e}"
                    )

        # Retention: the last keep_last complete checkpoints, `latest` naming the newest, nothing else but the
        # converted copies of kept ones (a world-size change publishes one; it goes with its checkpoint).
        remote = f"{self.run}/checkpoints"
        files = storage.list_files(remote)
        saved = sorted({a.steps, *range(a.every, a.steps + 1, a.every)}, reverse=True)  # every save, newest first
        want_tags = {tag_for(s) for s in saved[: a.keep]}
        entries = [(rel.split("/")[0], rel) for rel in files if rel.startswith("step_")]
        tags = {tag for tag, _ in entries if not tag.endswith(UNIVERSAL)}
        complete = {tag for tag, rel in entries if tag in tags and rel.endswith(f"/{MARKER}")}
        converted = {tag.removesuffix(UNIVERSAL) for tag, _ in entries if tag.endswith(UNIVERSAL)}
        others = sorted(rel for rel in files if not rel.startswith("step_") and rel != "latest")
        if tags != want_tags or complete != want_tags or others or not converted <= want_tags:
            rep.failures.append(
                f"the prefix holds {sorted(tags)} ({sorted(complete)} complete), converted copies of "
                f"{sorted(converted)} and {others}, "
                f"not just {sorted(want_tags)}"
            )
        if storage.read_text(f"{remote}/latest").strip() != tag_for(a.steps):
            rep.failures.append("checkpoints/latest does not name the last step")

    # -------------------------------------------------------------------------------------------- report
    def table(self) -> str:
        rep = self.report
        by_kind = collections.Counter(k.kind for k in rep.kills)
        rows = [
            ("kills", f"{len(rep.kills)} ({', '.join(f'{by_kind[k]} {k}' for k in KINDS)})"),
            *((f"faults: {k}", f"{rep.faults.get(k, 0)}") for k in FAULT_KINDS),
            ("requests through the proxy", f"{rep.requests}"),
            ("world sizes", " -> ".join(map(str, rep.worlds)) + f" (P = {self.args.partitions})"),
            ("resumed at steps", ", ".join(rep.resumes) + " (-: killed before it began)"),
            ("checkpoints marked complete", f"{len(rep.verified)}, {sum(not p for p in rep.verified.values())} whole"),
            ("examples lost", f"{rep.lost}"),
            ("examples duplicated", f"{rep.duplicated}"),
            ("losses after the last restart", f"replayed: max rel difference {rep.loss_rel_last:.1e}"),
            ("losses from step 0", f"uninterrupted run: max rel difference {rep.loss_rel:.1e}"),
            ("wall time", f"{rep.wall_s:.0f} s"),
        ]
        width = max(len(k) for k, _ in rows)
        a = self.args
        lines = [f"| {'soak':{width}} | {a.steps} steps x {a.batch} examples, tiny preset, seed {a.seed} |"]
        lines += [f"|{'-' * (width + 2)}|---|", *(f"| {k:{width}} | {v} |" for k, v in rows)]
        lines += ["", "kills:"]
        lines += [f"  {k.attempt:2d}  {k.world} rank(s)  {k.kind:6s}  step {k.last_step:4d}  {k.at}" for k in rep.kills]
        for k in rep.kills:
            if k.kind == "freeze" and k.detected_s is not None:
                lines += [f"  freeze of attempt {k.attempt}: ended {k.detected_s:.1f}s after the SIGSTOP; {k.watchdog}"]
        lines += ["", "restarts (failure -> the restarted attempt's first step done; its startup line's parts):"]
        lines += [
            f"  {r.attempt:2d}  {r.world} rank(s)  {r.since_failure_s:6.1f}s  "
            f"(in the process {r.process_s:.1f}s: {r.parts})"
            for r in rep.restarts
        ]
        lines += ["checks: " + ("all passed" if not rep.failures else f"{len(rep.failures)} failed")]
        lines += [f"  FAILED: {f}" for f in rep.failures]
        return "\n".join(lines)

    def summary(self) -> dict:
        rep = self.report
        return {
            "kills": len(rep.kills),
            "restart_s": [round(r.since_failure_s, 1) for r in rep.restarts],
            "faults": rep.faults,
            "lost": rep.lost,
            "duplicated": rep.duplicated,
            "loss_rel_replay": rep.loss_rel_last,
            "loss_rel_reference": rep.loss_rel,
            "world_sizes": rep.worlds,
            "wall_s": round(rep.wall_s, 1),
            "ok": not rep.failures,
        }


def _step_records(cache: Path) -> dict[int, tuple[list[int], list[int]]]:
    """step -> (positions, examples), paired as the ranks recorded them."""
    out: dict[int, tuple[list[int], list[int]]] = {}
    for path in sorted(Path(cache, "samples").glob("rank_*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            pos, ex = out.setdefault(rec["step"], ([], []))
            pos.extend(rec["positions"])
            ex.extend(rec["samples"])
    return out


def _ranges(steps: list[int]) -> str:
    return f"{steps[:3]}...{steps[-3:]} ({len(steps)})" if len(steps) > 6 else str(steps)


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/soak.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=10, help="kill -9 this many times (default 10)")
    p.add_argument("--steps", type=int, default=400, help="train.max_steps (default 400)")
    p.add_argument("--seed", type=int, default=0, help="draws the kills and the faults (default 0)")
    p.add_argument("--world-sizes", default="2,1,4,2", help="ranks of each attempt, in turn (default 2,1,4,2)")
    p.add_argument("--partitions", type=int, default=4, help="data.partitions: P, which they must divide (default 4)")
    p.add_argument("--batch", type=int, default=32, help="train.global_batch_size (default 32, the tiny preset's)")
    p.add_argument("--every", type=int, default=10, help="checkpoint.every_steps (default 10)")
    p.add_argument("--keep", type=int, default=2, help="checkpoint.keep_last (default 2)")
    p.add_argument(
        "--step-timeout", type=float, default=60.0, help="run.timeouts.step_s: how soon a freeze is noticed (60)"
    )
    for kind in FAULT_KINDS:
        p.add_argument(f"--{kind}-rate", type=float, default=0.02, help=f"share of requests given a {kind} (0.02)")
    p.add_argument("--bucket", help="s3://bucket of the S3 named by AWS_ENDPOINT_URL etc. (default: a SeaweedFS)")
    p.add_argument("--shards", help="prepared shards (local) to use (default: prepared from tests/corpus.py)")
    p.add_argument("--reference-world", type=int, help="ranks of the reference run (default: the first world size)")
    p.add_argument("--reference", help="cache dir of an uninterrupted run of the same settings (default: run one)")
    p.add_argument("--workdir", help="where logs and staging go (default: a new temporary directory)")
    args = p.parse_args(argv)
    try:
        args.world_sizes = [int(w) for w in args.world_sizes.split(",")]
    except ValueError:
        p.error(f"--world-sizes={args.world_sizes} must be comma-separated numbers of ranks, e.g. 2,1,4,2")
    bad = [w for w in [*args.world_sizes, args.reference_world or 1] if w < 1 or args.partitions % w or args.batch % w]
    if bad:
        p.error(f"world sizes {bad} must divide --partitions={args.partitions} and --batch={args.batch}")
    if args.kills < 0 or args.steps < 1 or args.every < 1 or args.keep < 1:
        p.error("--kills must be >= 0, and --steps, --every and --keep >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="soak-"))
    work.mkdir(parents=True, exist_ok=True)
    server = None
    try:
        if args.bucket:
            bucket = args.bucket.rstrip("/")
        else:
            server = SeaweedS3(work / "seaweedfs").start()
            os.environ.update(server.env())
            bucket = f"s3://soak-{uuid.uuid4().hex[:8]}"
            server.create_bucket(bucket.removeprefix("s3://"))
        storage.reset_client()
        local = args.shards or prepare_shards(write_corpus(work / "corpus.jsonl"), str(work / "shards"))[0]
        shards = f"{bucket}/shards"
        for name in storage.list_files(local):
            storage.upload_file(Path(local, name), storage.join(shards, name))
        soak = Soak(args, bucket, shards, load_manifest(local).vocab_size, work, os.environ["AWS_ENDPOINT_URL"])
        print(f"soak: {work}; shards in {shards}; the reference run first", file=sys.stderr, flush=True)
        reference = soak.reference()
        soak.soak()
        soak.check(reference)
        soak.report.wall_s = time.monotonic() - started
        print(soak.table())
        print(json.dumps(soak.summary()))
        return 0 if not soak.report.failures else 1
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
