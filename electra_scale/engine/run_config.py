"""The run config as the commands read it: ``config.load_config`` plus the checks that need the engine's
knowledge, made when the config loads, before any expensive work, as one line with exit 2:

* ``model.init_from``: the shape comes from the directory's config.json (``pretrained.adopt_shape``), and a
  key that contradicts it is refused;
* ``run.trackers``: a tracker whose package is missing is refused, naming the extra.

config.py stands below the engine and imports none of it; these checks live up here instead.
"""

from __future__ import annotations

from pathlib import Path

from electra_scale.config import Config, config_from_dict, read_config
from electra_scale.engine.pretrained import adopt_shape
from electra_scale.engine.trackers import check_installed


def load_run_config(paths: str | Path | list | tuple | None, overrides: list[str] = ()) -> Config:
    raw, source = read_config(paths, overrides)
    model = raw.get("model")
    if isinstance(model, dict) and model.get("init_from"):
        adopt_shape(raw)  # before the typed config: the shape it validates is the directory's
    cfg = config_from_dict(raw, source)
    check_installed(cfg.run.trackers)
    return cfg
