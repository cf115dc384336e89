"""A pytest plugin for scripts/gpu_check.sh: each test's outcome appended to ``$GPU_CHECK_TESTS_OUT`` (JSON Lines)
the moment it is known, and a ``started`` line before it runs.

pytest writes its junit XML only at the session's end, so a step killed at its time limit (the slow compiled-layers
test) left no outcome at all, not even for the tests that had passed. Here every finished test is on disk, and a
``started`` line with no outcome after it names the test that was cut (scripts/gpu_summary.py shows it as such).

    GPU_CHECK_TESTS_OUT=F python -m pytest -p gpu_pytest_log ...   (scripts/ on PYTHONPATH)
"""

from __future__ import annotations

import json
import os


def _write(record: dict) -> None:
    path = os.environ.get("GPU_CHECK_TESTS_OUT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def pytest_runtest_logstart(nodeid, location):
    _write({"test": nodeid.split("::")[-1], "outcome": "started"})


def pytest_runtest_logreport(report):
    # One line per test: its call's outcome, or the setup's when that failed or skipped it, or a failed teardown's.
    if (
        report.when == "call"
        or (report.when == "setup" and not report.passed)
        or (report.when == "teardown" and report.failed)
    ):
        # The junit XML's words (gpu_summary.py reads both): passed, failure, skipped, error.
        outcome = "skipped" if report.skipped else "error" if report.when != "call" else report.outcome
        outcome = {"failed": "failure"}.get(outcome, outcome)
        _write({"test": report.nodeid.split("::")[-1], "outcome": outcome, "seconds": round(report.duration, 3)})
