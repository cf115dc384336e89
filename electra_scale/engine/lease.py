"""One writer per run: a lease in ``run.output_dir`` that rank 0 holds while the run may write there.

Two runs on one output dir each mark checkpoints complete, prune the other's and overwrite metrics.jsonl. It
happens without anyone meaning it: a SLURM requeue starts while the old job's ranks are still uploading, or a
Kubernetes Job starts a replacement pod while the old one is partitioned away, not dead. So a run first takes
the lease, a small record naming its holder (host, job, pid, a random token), and rank 0 refreshes it (a
heartbeat) from a background thread every ``run.lease_timeout_s / 5`` seconds. Only rank 0 talks to the
store: the other ranks learn that the lease was lost from the step's stop vote (train.py), which is already
an all-reduce, so W = 512 ranks add nothing to the store's load and nothing to a step.

Where the lease lives, and how a write stays one writer's:

    s3://.../RUN/lease.json         one object. Created with ``If-None-Match: *`` (the store answers 412 if it
                                    exists), refreshed and taken over with ``If-Match: <the ETag read>``,
                                    released with a conditional DELETE: every change is a compare-and-swap on
                                    the server. A store that ignores the conditions (found by a second create,
                                    which must fail) falls back to comparing the record's generation number
                                    before each write: it catches a takeover at the next heartbeat, but two runs
                                    starting within the same second could both believe they won.
    /local/RUN/lease/<gen>.json     one file per generation, made by ``os.link`` of a complete temporary file:
                                    an exclusive create (EEXIST if another writer made that generation) that
                                    no reader sees half written. The lease is the highest generation; every
                                    write makes the next one and removes the older ones, so a holder left behind
                                    fails its next write or sees the newer generation.

A run that finds a lease takes it only if one of these holds, and says which in a warning:

- ``run.take_over=true`` (the user says the other run is gone or must stop);
- no heartbeat for the holder's own ``lease_timeout_s`` (default 600 s), measured by the store's clock
  (S3: the response's Date minus the object's LastModified; local: the file's mtime), so host clocks may
  differ;
- the holder ran on this machine (same boot and pid namespace) and its process is gone: a kill -9 or a crash
  restarted on the same node needs no wait;
- it is a later incarnation of the same job: the same ``SLURM_JOB_ID`` with a higher ``SLURM_RESTART_COUNT``
  (a requeue), or the same ``ELECTRA_JOB_ID`` with another ``ELECTRA_JOB_INSTANCE`` (the Kubernetes Job's
  name and the pod's uid, k8s/base/job.yaml). A requeue that overlaps its predecessor is then exactly the
  explicit takeover: the predecessor's next heartbeat or checkpoint check fails, and it stops writing.

Otherwise it refuses to start (``LeaseHeld``, exit 2) with one line naming the holder and the way to take over.
A run whose lease was taken stops writing (``LeaseLost``, exit 1): rank 0 checks the lease (a conditional
refresh) right before it marks a checkpoint complete and before it prunes, and the loop stops every rank at
the next step without saving. A normal end, and an error that ends the process, release the lease; a kill -9
leaves it for the rules above. What remains possible: the predecessor's writes already in flight when it is
taken over (at most one checkpoint's upload, never marked complete by it, and parts the new holder ignores).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch.distributed as dist

from electra_scale.config import ConfigError
from electra_scale.engine.checkpoint import CheckpointError
from electra_scale.infra import storage

log = logging.getLogger("electra_scale")


class LeaseHeld(ConfigError):
    """Another live run holds the lease: this one must not start (exit 2, like any input that cannot work)."""


class LeaseLost(CheckpointError):
    """This run's lease was taken: it must stop writing (exit 1)."""


# ------------------------------------------------------------------------------------------------ holder
def _space() -> str:
    """Where a pid means one process: this boot of this machine and this pid namespace (a container has its
    own). Two holders with the same space can ask the kernel whether the other's pid is alive."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return socket.gethostname()


def _job(env) -> tuple[str | None, str | None]:
    """(job, incarnation): ELECTRA_JOB_ID/ELECTRA_JOB_INSTANCE (any scheduler; the Kubernetes manifests set
    them), else SLURM's job id and restart count. None when the run belongs to no job."""
    if env.get("ELECTRA_JOB_ID"):
        return env["ELECTRA_JOB_ID"], env.get("ELECTRA_JOB_INSTANCE")
    if env.get("SLURM_JOB_ID"):
        return f"slurm {env['SLURM_JOB_ID']}", env.get("SLURM_RESTART_COUNT", "0")
    return None, None


@dataclass
class Holder:
    """The lease's record (its JSON). ``beat`` counts heartbeats: the record changes at every write."""

    token: str
    host: str
    pid: int
    job: str | None
    instance: str | None
    space: str
    timeout_s: float
    started: float = field(default_factory=time.time)
    heartbeat: float = field(default_factory=time.time)  # the holder's clock: for people; age uses the store's
    beat: int = 0
    released: bool = False  # a local lease's last generation after a release (see Lease.release)

    @classmethod
    def this_process(cls, timeout_s: float, env=None) -> Holder:
        job, instance = _job(os.environ if env is None else env)
        return cls(uuid.uuid4().hex, socket.gethostname(), os.getpid(), job, instance, _space(), timeout_s)

    def describe(self, age: float) -> str:
        return f"host {self.host}, job {self.job or '-'}, pid {self.pid}, last heartbeat {age:.0f}s ago"

    def encode(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def decode(cls, data: bytes) -> Holder | None:
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError):
            return None  # not a lease this code wrote: treated as a live holder of unknown name


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def take_over_reason(me: Holder, them: Holder | None, age: float, take_over: bool) -> str | None:
    """Why this run may take a lease held by ``them`` (None: it may not)."""
    if take_over:
        return "run.take_over=true"
    timeout = them.timeout_s if them is not None else me.timeout_s
    if age > timeout:
        return f"it is stale: no heartbeat for {age:.0f}s (its lease_timeout_s is {timeout:g})"
    if them is None:
        return None
    if them.space == me.space and not _pid_alive(them.pid):
        return f"its process {them.pid} on this machine is gone"
    if me.job is not None and me.job == them.job and me.instance != them.instance:
        try:
            later = int(me.instance or 0) > int(them.instance or 0)  # SLURM: the restart count
        except ValueError:
            later = True  # a pod uid: the Job controller made this pod after that one
        if later:
            return f"this is a later incarnation of job {me.job} ({them.instance} -> {me.instance})"
    return None


# ------------------------------------------------------------------------------------------------ stores
@dataclass
class Found:
    holder: Holder | None
    version: str  # S3: the ETag; local: the generation
    age: float


class _S3Lease:
    """``RUN/lease.json``, every change conditional on the ETag last read (or, on a store that ignores the
    conditions, on the record read just before)."""

    def __init__(self, output_dir: str):
        self.url = storage.join(output_dir, "lease.json")
        self.conditional = True

    def read(self) -> Found | None:
        got = storage.read_versioned(self.url)
        return None if got is None else Found(Holder.decode(got[0]), got[1], got[2])

    def create(self, data: bytes, version: str | None) -> str:
        """Write the lease if it is absent (``version`` None) or still at ``version``; the new version."""
        if not self.conditional:
            found = self.read()
            if (found.version if found else None) != version:
                raise storage.PreconditionFailed(f"{self.url} changed")
            storage.write_bytes(self.url, data)
            found = self.read()
            if found is None or found.holder is None or found.holder.encode() != data:
                raise storage.PreconditionFailed(f"{self.url} was written by another run at the same time")
            return found.version
        return storage.put_if(self.url, data, version)

    def probe(self, data: bytes) -> None:
        """After a create: a second create must fail. If the store writes it, it ignores the conditions."""
        try:
            storage.put_if(self.url, data, None)
        except storage.PreconditionFailed:
            return
        except storage.ConditionsUnsupported:
            pass
        self.conditional = False
        log.warning(
            "lease: %s ignores conditional writes (If-None-Match); the lease falls back to comparing its "
            "generation before each write, which catches a takeover at the next heartbeat but not two runs "
            "starting within the same second",
            self.url,
        )

    def release(self, version: str, last: bytes, only_writer: bool) -> None:
        if self.conditional:
            storage.delete_if(self.url, version)
            return
        found = self.read()
        if found is None or found.version != version:
            raise storage.PreconditionFailed(f"{self.url} changed")
        storage.delete_prefix(self.url)  # one object: the plain delete


class _LocalLease:
    """``RUN/lease/<generation>.json``, each generation made once with an exclusive ``os.link``."""

    def __init__(self, output_dir: str):
        self.root = Path(output_dir)
        self.dir = self.root / "lease"
        self.created: list[Path] = []  # directories this lease made, to remove again if it was the only writer

    def _generations(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(p.stem) for p in self.dir.glob("*.json") if p.stem.isdigit())

    def _path(self, gen: int) -> Path:
        return self.dir / f"{gen:012d}.json"

    def read(self) -> Found | None:
        for gen in reversed(self._generations()):
            try:
                path = self._path(gen)
                data, age = path.read_bytes(), max(0.0, time.time() - path.stat().st_mtime)
            except FileNotFoundError:  # removed by a newer writer: read the newer one
                continue
            return Found(Holder.decode(data), str(gen), age)
        return None

    def create(self, data: bytes, version: str | None) -> str:
        if not self.created and not self.dir.exists():
            self.created = [p for p in (self.dir, self.root, *self.root.parents) if not p.exists()]
        self.dir.mkdir(parents=True, exist_ok=True)
        gen = int(version or 0) + 1
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".lease.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, self._path(gen))  # exclusive: EEXIST if another writer made this generation
        except FileExistsError as err:
            raise storage.PreconditionFailed(f"{self._path(gen)} was made by another run") from err
        finally:
            Path(tmp).unlink(missing_ok=True)
        if self._generations()[-1] != gen:
            # Ours is not the newest: a writer moved on (and removed this generation) while we were away.
            self._path(gen).unlink(missing_ok=True)
            raise storage.PreconditionFailed(f"{self.dir} has a newer generation than {gen}")
        for old in self._generations():
            if old < gen:
                self._path(old).unlink(missing_ok=True)
        return str(gen)

    def probe(self, data: bytes) -> None:
        pass

    def release(self, version: str, last: bytes, only_writer: bool) -> None:
        """The only writer this lease ever had removes it (and the directories it made). Any other release
        writes ``last``, a last generation marked released: were the files gone, a holder left behind could
        make generation 1 again and believe it held the lease."""
        if not only_writer:
            self.create(last, version)
            return
        self._path(int(version)).unlink(missing_ok=True)
        for path in self.created:  # deepest first; a directory that holds the run's files stays
            with contextlib.suppress(OSError):
                path.rmdir()


# ------------------------------------------------------------------------------------------------ lease
class Lease:
    """The lease as rank 0 holds it. ``check()`` before every write that must be this run's alone."""

    def __init__(self, output_dir: str, store, holder: Holder, version: str, only_writer: bool):
        self.output_dir, self.store, self.holder, self.version = output_dir, store, holder, version
        self.only_writer = only_writer  # it made the lease, and no one else has written it since
        self.lost: str | None = None  # why, once it is lost
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeats, name="lease-heartbeat", daemon=True)
        self._thread.start()
        # An error that ends the process releases the lease (a kill -9 cannot): the next run need not wait.
        atexit.register(self.release)

    @property
    def token(self) -> str:
        return self.holder.token

    @classmethod
    def acquire(cls, output_dir: str, timeout_s: float, take_over: bool, me: Holder | None = None) -> Lease:
        me = me or Holder.this_process(timeout_s)
        store = _S3Lease(output_dir) if storage.is_s3(output_dir) else _LocalLease(output_dir)
        tried_absent = None  # the last lap's create: of an absent lease (True) or over a holder (False)
        for _ in range(20):  # each lap follows another writer that moved first
            found = store.read()
            # Our own create landed, its answer was lost, and the retry failed its precondition: ours.
            if tried_absent is not None and found is not None and found.holder and found.holder.token == me.token:
                return cls(output_dir, store, me, found.version, only_writer=tried_absent)
            free = found is None or (found.holder is not None and found.holder.released)
            reason = None
            if not free:
                reason = take_over_reason(me, found.holder, found.age, take_over)
                if reason is None:
                    raise LeaseHeld(refusal(output_dir, found))
            tried_absent = found is None
            try:
                version = store.create(me.encode(), found.version if found else None)
            except storage.ConditionsUnsupported:
                store.conditional = False
                continue
            except storage.PreconditionFailed:
                continue
            if found is None:
                store.probe(me.encode())
                if not getattr(store, "conditional", True):  # the probe's write may have changed the ETag
                    version = store.read().version
            elif reason is not None:
                log.warning("lease: taking over %s from %s: %s", output_dir, _named(found), reason)
            return cls(output_dir, store, me, version, only_writer=found is None)
        raise LeaseHeld(f"the lease of run.output_dir={output_dir} keeps changing hands; is another run starting?")

    def check(self) -> None:
        """Raise ``LeaseLost`` unless this run still holds the lease, proven by a conditional refresh now."""
        with self._lock:
            if self.lost is not None:
                raise LeaseLost(self.lost)
            record = replace(self.holder, beat=self.holder.beat + 1, heartbeat=time.time())
            try:
                self.version = self.store.create(record.encode(), self.version)
                self.holder = record
                return
            except storage.PreconditionFailed:
                found = self.store.read()
            if found is not None and found.holder == record:  # our write landed; only its answer was lost
                self.version, self.holder = found.version, record
                return
            self.only_writer = False
            now = "nobody holds it now" if found is None or found.holder is None else f"now held by {_named(found)}"
            self.lost = (
                f"this run lost its lease on run.output_dir={self.output_dir} ({now}): another run took over, so "
                "this one stops writing: it marks no checkpoint complete and prunes nothing"
            )
            raise LeaseLost(self.lost)

    def _heartbeats(self) -> None:
        interval = max(1.0, self.holder.timeout_s / 5)
        while not self._stop.wait(interval):
            try:
                self.check()
            except LeaseLost as err:
                log.error("lease: %s", err)
                return
            except storage.StorageError as err:  # the store is away: the next beat tries again
                log.warning("lease: heartbeat failed (%s); trying again in %.0fs", err, interval)

    def release(self) -> None:
        """End of the run: stop the heartbeat and give the lease up (unless it was lost)."""
        self._stop.set()
        atexit.unregister(self.release)
        with self._lock:
            if self.lost is not None:
                return
            self.lost = "released"
            last = replace(self.holder, released=True, beat=self.holder.beat + 1, heartbeat=time.time())
            try:
                self.store.release(self.version, last.encode(), self.only_writer)
            except storage.PreconditionFailed:
                log.warning("lease: %s was taken by another run before this one released it", self.output_dir)
            except storage.StorageError as err:
                log.warning("lease: could not release %s (%s); it goes stale by itself", self.output_dir, err)


def _named(found: Found) -> str:
    return found.holder.describe(found.age) if found.holder else f"an unreadable lease, written {found.age:.0f}s ago"


def refusal(output_dir: str, found: Found) -> str:
    timeout = found.holder.timeout_s if found.holder else None
    stale = f"it goes stale {timeout:g}s after its last heartbeat, or " if timeout else ""
    return (
        f"run.output_dir={output_dir} is in use by another run ({_named(found)}); two runs must not write one "
        f"output dir. If that run is gone or must stop, {stale}take over now with run.take_over=true (it then "
        "stops writing); or use another run.output_dir"
    )


class Follower:
    """The lease as every other rank sees it: rank 0's token (for the checkpoint parts they write) and
    nothing to check. They learn of a lost lease from the step's stop vote, never from the store."""

    lost = None

    def __init__(self, token: str):
        self.token = token

    def check(self) -> None:
        pass

    def release(self) -> None:
        pass


def hold(output_dir: str, timeout_s: float, take_over: bool, is_main: bool, group=None) -> Lease | Follower:
    """Rank 0 takes the lease; every rank then knows the outcome (a refusal raises ``LeaseHeld`` on all ranks,
    with the same line). Collective."""
    lease, outcome = None, None
    if is_main:
        try:
            lease = Lease.acquire(output_dir, timeout_s, take_over)
            outcome = ("ok", lease.token)
        except LeaseHeld as err:
            outcome = ("held", str(err))
    box = [outcome]
    dist.broadcast_object_list(box, src=0, group=group)
    kind, text = box[0]
    if kind == "held":
        raise LeaseHeld(text)
    return lease if lease is not None else Follower(text)
