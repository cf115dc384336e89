"""The errors a user fixes: each says in one line what is wrong and how to fix it, and the CLI exits 2 on them
(cli.py). They live on the lowest floor so that every module may raise them without importing the module that
owns the concept (infra/fetch raises DataError without importing data/)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem, explained in one line."""


class DataError(ValueError):
    """A problem with the data itself (missing/corrupt shards, a manifest that does not fit the model)."""
