"""How ru_manpages.txt and zh_manpages.txt were made (see README.md): the roff of a Debian manual-page package's
pages as plain paragraphs, one document per page, up to a byte budget.

    apt-get download manpages-ru manpages-zh && dpkg-deb -x manpages-ru_*.deb ru && dpkg-deb -x manpages-zh_*.deb zh
    python extract_manpages.py ru/usr/share/man/ru 130000 > ru_manpages.txt
    python extract_manpages.py zh/usr/share/man/zh_CN/man1 45000 6000 > zh_manpages.txt
"""

import gzip
import pathlib
import re
import sys

MACRO = re.compile(r"\.(SH|SS|B|I|BR|IR|RB|BI|IB)\s+(.*)")
BREAK = re.compile(r"\.(PP|P|LP|TP|IP|sp|br)\b")


def paragraphs(path: pathlib.Path) -> list[str]:
    out = []
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        text = f.read().splitlines()
    for line in text:
        if line.startswith(("'\\\"", '.\\"')):
            continue
        if line.startswith("."):
            m = MACRO.match(line)
            if not m:
                if BREAK.match(line):
                    out.append("")
                continue
            line = m.group(2).replace('"', "")
        line = re.sub(r"\\f[BIRPC]|\\f\(..|\\f\[[^]]*\]", "", line)
        line = re.sub(r"\\\(..", "", line).replace("\\-", "-").replace("\\&", "").replace("\\e", "\\")
        line = re.sub(r"\\[*][a-zA-Z(]..?", "", line.replace("\\ ", " "))
        out.append(line.strip())
    paras = [" ".join(p.split("\n")).strip() for p in "\n".join(out).split("\n\n")]
    return [p for p in paras if len(p) > 40]


def main() -> None:
    root, limit = pathlib.Path(sys.argv[1]), int(sys.argv[2])
    per_doc = int(sys.argv[3]) if len(sys.argv) > 3 else None
    size, docs = 0, []
    for page in sorted(root.rglob("*.gz")):
        doc = "\n".join(paragraphs(page))[:per_doc]
        if not doc:
            continue
        docs.append(doc)
        size += len(doc.encode())
        if size > limit:
            break
    print("\n\n".join(docs))


if __name__ == "__main__":
    main()
