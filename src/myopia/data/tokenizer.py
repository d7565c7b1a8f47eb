"""Tokenizers: bytes, a byte-level BPE trained on the corpus, GPT-2's BPE (shipped), or any Hugging
Face tokenizer by name or local folder.

All are returned as a :class:`TextTokenizer` with ``encode_batch``, ``decode``, ``vocab_size`` and a
``fingerprint`` that keys the token cache (a changed tokenizer invalidates the cache).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

from myopia.data.corpus import DataError, Document


@dataclass
class TextTokenizer:
    name: str
    vocab_size: int
    fingerprint: str
    encode_batch: Callable[[list[str]], list[list[int]]]
    decode: Callable[[list[int]], str]
    backend: object = None
    """The `tokenizers.Tokenizer` or transformers tokenizer behind it (None for bytes), for export."""


def byte_tokenizer() -> TextTokenizer:
    return TextTokenizer(
        name="byte", vocab_size=256, fingerprint="byte-utf8-v1",
        encode_batch=lambda texts: [list(t.encode("utf-8")) for t in texts],
        decode=lambda ids: bytes(int(i) for i in ids).decode("utf-8", errors="replace"),
    )


def _wrap(name: str, tok) -> TextTokenizer:
    """Wrap a `tokenizers.Tokenizer`."""
    fingerprint = hashlib.sha256(tok.to_str().encode()).hexdigest()
    return TextTokenizer(
        name=name, vocab_size=tok.get_vocab_size(), fingerprint=fingerprint,
        encode_batch=lambda texts: [e.ids for e in tok.encode_batch(texts)],
        decode=lambda ids: tok.decode([int(i) for i in ids]), backend=tok,
    )


def gpt2_tokenizer() -> TextTokenizer:
    """OpenAI's GPT-2 BPE (vocabulary 50257), from the files shipped with myopia."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    folder = resources.files("myopia.data").joinpath("tokenizers/gpt2")
    with resources.as_file(folder) as path:
        tok = Tokenizer(models.BPE.from_file(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return _wrap("gpt2", tok)


def neox_tokenizer() -> TextTokenizer:
    """EleutherAI's GPT-NeoX-20B BPE, the Pythia models' tokenizer (vocabulary 50277), shipped with myopia."""
    import lzma

    from tokenizers import Tokenizer

    data = resources.files("myopia.data").joinpath("tokenizers/gpt-neox/tokenizer.json.xz").read_bytes()
    return _wrap("gpt-neox", Tokenizer.from_str(lzma.decompress(data).decode("utf-8")))


def train_bpe(docs: list[Document], vocab_size: int, save_path: str | None = None) -> TextTokenizer:
    """A byte-level BPE of ``vocab_size`` trained on ``docs`` (seconds for a few MB of text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if save_path and os.path.isfile(save_path):
        return _wrap(f"bpe{vocab_size}", Tokenizer.from_file(save_path))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=[])
    tok.train_from_iterator((d.text for d in docs), trainer=trainer)
    if save_path:
        os.makedirs(os.path.dirname(save_path), exist_ok=True)
        tmp = f"{save_path}.tmp-{os.getpid()}"
        tok.save(tmp)
        os.replace(tmp, save_path)
    return _wrap(f"bpe{vocab_size}", tok)


def hf_tokenizer(name: str, label: str | None = None, **kwargs) -> TextTokenizer:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise DataError(f"data.tokenizer: hf:{name} needs transformers: pip install 'myopia[hf]'") from None
    try:
        tok = AutoTokenizer.from_pretrained(name, **kwargs)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DataError(f"data.tokenizer: could not load tokenizer {name!r} ({first}); offline, pass a local "
                        "folder holding tokenizer.json") from None
    if getattr(tok, "clean_up_tokenization_spaces", False):
        tok.clean_up_tokenization_spaces = False  # that clean-up would strip spaces from decoded BPE text
    backend = getattr(tok, "backend_tokenizer", None)
    fingerprint = hashlib.sha256(backend.to_str().encode()).hexdigest() if backend is not None else name
    return TextTokenizer(
        name=label or f"hf:{name}", vocab_size=len(tok), fingerprint=fingerprint,
        encode_batch=lambda texts: tok(texts, add_special_tokens=False)["input_ids"],
        decode=lambda ids: tok.decode([int(i) for i in ids]), backend=tok,
    )


def build_tokenizer(spec: str, vocab_size: int, train_docs: list[Document], cache_dir: str) -> TextTokenizer:
    """``spec``: byte | bpe (trained here at ``vocab_size``) | gpt2 | gpt-neox | smollm2 | hf:<name or folder>."""
    if spec == "byte":
        return byte_tokenizer()
    if spec == "gpt2":
        return gpt2_tokenizer()
    if spec == "gpt-neox":
        return neox_tokenizer()
    if spec == "bpe":
        from myopia.data.corpus import fingerprint

        key = hashlib.sha256(f"{fingerprint(train_docs)}-{vocab_size}".encode()).hexdigest()[:16]
        return train_bpe(train_docs, vocab_size, os.path.join(cache_dir, f"bpe{vocab_size}-{key}.json"))
    if spec.startswith("hf:"):
        return hf_tokenizer(spec[3:])
    if spec == "smollm2":
        from myopia.config import ConfigError
        from myopia.data.smollm2 import smollm2_gguf

        try:
            folder, name = smollm2_gguf()
        except ConfigError as exc:
            raise DataError(f"data.tokenizer: {exc}") from None
        return hf_tokenizer(folder, label="smollm2", gguf_file=name)
    raise DataError(f"data.tokenizer={spec!r} is not one of byte, bpe, gpt2, gpt-neox, smollm2, hf:<name or folder>")
