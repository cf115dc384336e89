"""The package's floors hold: config stands below everything it configures, and no import runs back up
(scripts/import_graph.py reads every import, function-level ones too, from the source)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _import_graph():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_circle_and_no_arrow_back_up():
    graph = _import_graph()
    edges = graph.graph()
    assert edges["electra_scale.engine.train"] >= {"electra_scale.config", "electra_scale.engine.step"}  # it reads
    assert graph.circles(edges) == []
    assert graph.upward(edges) == []


def test_the_graph_finds_a_circle_and_an_upward_arrow():
    graph = _import_graph()
    edges = {"electra_scale.config": {"electra_scale.engine.x"}, "electra_scale.engine.x": {"electra_scale.config"}}
    assert graph.circles(edges) == [["electra_scale.config", "electra_scale.engine.x"]]
    assert graph.upward(edges) == [("electra_scale.config", "electra_scale.engine.x")]


def test_config_imports_nothing_above_it():
    """Loading a config, as a fresh process does, brings in no engine, data, eval or tools module."""
    code = (
        "import sys, json; from electra_scale.config import load_config; load_config('configs/tiny.yaml'); "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('electra_scale'))))"
    )
    loaded = json.loads(
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    )
    assert "electra_scale.config" in loaded
    above = [m for m in loaded if m.split(".")[1:2] and m.split(".")[1] in ("engine", "data", "eval", "tools")]
    assert above == []
