"""Token caches: a corpus tokenized once into a memory-mapped file with a checked header.

Layout: a 4096-byte JSON header (magic, format version, the key that names what was tokenized with
what, dtype, token and document counts, sha256 of the payload), then the document offsets
(int64, n_docs + 1), then the tokens. A cache whose key or version differs (stale) or whose size or
checksum is wrong (corrupt, e.g. a torn write) is rebuilt, with a message saying why.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

def default_cache_dir() -> str:
    """Where tokenizers, token caches and converted models live: $MYOPIA_CACHE or ~/.cache/myopia."""
    return os.environ.get("MYOPIA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "myopia"))


MAGIC = "myopia-token-cache"
VERSION = 1
HEADER_BYTES = 4096


@dataclass
class TokenArray:
    tokens: np.ndarray  # memory-mapped, 1-D
    doc_offsets: np.ndarray  # (n_docs + 1,), document d is tokens[off[d]:off[d+1]]
    path: str

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1


def _payload_digest(path: str, start: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _check(path: str, key: str) -> tuple[dict | None, str | None]:
    """Return ``(header, None)`` for a good cache or ``(None, why)``."""
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
        header = json.loads(raw.rstrip(b"\0").decode())
    except (OSError, ValueError, UnicodeDecodeError):
        return None, "its header is unreadable (corrupt)"
    if header.get("magic") != MAGIC or header.get("version") != VERSION:
        return None, f"it has format version {header.get('version')} (stale; this myopia writes {VERSION})"
    if header.get("key") != key:
        return None, "it was built from another corpus or tokenizer (stale)"
    itemsize = np.dtype(header["dtype"]).itemsize
    want = HEADER_BYTES + 8 * (header["n_docs"] + 1) + itemsize * header["n_tokens"]
    if os.path.getsize(path) != want:
        return None, f"its size is {os.path.getsize(path)} bytes, not {want} (corrupt or torn)"
    if _payload_digest(path, HEADER_BYTES) != header["sha256"]:
        return None, "its checksum does not match (corrupt)"
    return header, None


def _open(path: str, header: dict) -> TokenArray:
    n_off = header["n_docs"] + 1
    offsets = np.memmap(path, dtype=np.int64, mode="r", offset=HEADER_BYTES, shape=(n_off,))
    tokens = np.memmap(path, dtype=header["dtype"], mode="r", offset=HEADER_BYTES + 8 * n_off,
                       shape=(header["n_tokens"],))
    return TokenArray(tokens=tokens, doc_offsets=np.asarray(offsets), path=path)


def load_or_build(path: str, key: str, texts: list[str], encode_batch: Callable[[list[str]], list[list[int]]],
                  vocab_size: int, desc: str = "tokenizing", log: Callable[[str], None] = print) -> TokenArray:
    """Open the cache at ``path`` if it is good for ``key``; otherwise tokenize ``texts`` into it."""
    if os.path.exists(path):
        header, why = _check(path, key)
        if header is not None:
            return _open(path, header)
        log(f"token cache {path}: {why}; rebuilding it")
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    offsets = [0]
    chunks = []
    batch = 64
    with tqdm(total=len(texts), desc=desc, unit="doc", leave=False, disable=None) as bar:
        for i in range(0, len(texts), batch):
            for ids in encode_batch(texts[i:i + batch]):
                arr = np.asarray(ids, dtype=dtype)
                chunks.append(arr)
                offsets.append(offsets[-1] + len(arr))
            bar.update(min(batch, len(texts) - i))
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)
    payload = np.asarray(offsets, dtype=np.int64).tobytes() + tokens.tobytes()
    header = {"magic": MAGIC, "version": VERSION, "key": key, "dtype": np.dtype(dtype).name,
              "n_tokens": len(tokens), "n_docs": len(texts), "vocab_size": vocab_size,
              "sha256": hashlib.sha256(payload).hexdigest()}
    raw = json.dumps(header).encode()
    with open(tmp, "wb") as f:
        f.write(raw + b"\0" * (HEADER_BYTES - len(raw)))
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return _open(path, header)
