"""Corpora as lists of documents: the built-in English corpus, local files, or Hugging Face datasets.

The split into training and held-out documents is by document (a stable hash of its source and
title), so held-out text is unseen text and the split does not change when documents are added.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
from dataclasses import dataclass
from importlib import resources

BUILTIN = "builtin"


class DataError(ValueError):
    """Unusable input data; the message is one line naming the input and the fix."""


@dataclass(frozen=True)
class Document:
    source: str
    title: str
    text: str


def builtin_documents() -> list[Document]:
    """The English corpus shipped with myopia (public domain / CC0 / MIT; see corpus/SOURCES.md)."""
    path = resources.files("myopia.data").joinpath("corpus/english.jsonl.xz")
    with resources.as_file(path) as p, lzma.open(p, "rt", encoding="utf-8") as f:
        return [Document(**json.loads(line)) for line in f if line.strip()]


def read_text_file(path: str, key: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as exc:
        raise DataError(f"{key}: {path!r} is not valid UTF-8 (byte {exc.start}); convert it to UTF-8") from None


def local_documents(path: str, key: str = "data.corpus") -> list[Document]:
    """A UTF-8 file (split into documents at blank lines) or a folder of .txt/.md files (one each)."""
    if not os.path.exists(path):
        raise DataError(f"{key}: {path!r} does not exist; pass a UTF-8 text file, a folder of .txt files, "
                        f"'{BUILTIN}' or hf:<dataset>")
    if os.path.isfile(path):
        text = read_text_file(path, key)
        parts = [p.strip() for p in text.split("\n\n") if p.strip()]
        docs = [Document("file", f"{os.path.basename(path)}#{i}", p) for i, p in enumerate(parts)]
    else:
        files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names
                       if f.endswith((".txt", ".md")))
        if not files:
            raise DataError(f"{key}: {path!r} holds no .txt or .md files")
        docs = [Document("file", os.path.relpath(f, path), read_text_file(f, key).strip()) for f in files]
        docs = [d for d in docs if d.text]
    if not docs:
        raise DataError(f"{key}: {path!r} holds no text")
    return docs


def hf_documents(name: str, key: str = "data.corpus", text_field: str = "text", split: str = "train") -> list[Document]:
    """A Hugging Face dataset by name (needs the `datasets` package and a network or a local cache)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{key}: hf:{name} needs the 'datasets' package: pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # offline, unknown name, ... : one line, not a hang or a traceback
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DataError(f"{key}: could not load Hugging Face dataset {name!r} ({first}); "
                        "offline, use a local folder or the built-in corpus") from None
    if text_field not in ds.column_names:
        raise DataError(f"{key}: dataset {name!r} has no column {text_field!r} (columns: {ds.column_names})")
    return [Document("hf", f"{name}#{i}", t) for i, t in enumerate(ds[text_field]) if t and t.strip()]


def load_documents(spec: str, key: str = "data.corpus") -> list[Document]:
    if spec == BUILTIN:
        return builtin_documents()
    if spec.startswith("hf:"):
        return hf_documents(spec[3:], key)
    return local_documents(spec, key)


def is_heldout(doc: Document, fraction: float) -> bool:
    digest = hashlib.sha256(f"{doc.source}\x00{doc.title}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_documents(docs: list[Document], heldout_fraction: float) -> tuple[list[Document], list[Document]]:
    """Training and held-out documents; at least one of each when there are two or more documents."""
    train = [d for d in docs if not is_heldout(d, heldout_fraction)]
    held = [d for d in docs if is_heldout(d, heldout_fraction)]
    if not held and len(train) > 1:
        held, train = train[-1:], train[:-1]
    if not train and len(held) > 1:
        train, held = held[:-1], held[-1:]
    return train, held


def fingerprint(docs: list[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.source.encode())
        h.update(b"\x00")
        h.update(d.title.encode())
        h.update(b"\x00")
        h.update(hashlib.sha256(d.text.encode()).digest())
    return h.hexdigest()
