"""Text data: the built-in corpus, document-level split, tokenizers and the token cache."""

import json
import os

from myopia.data.cache import HEADER_BYTES, load_or_build
from myopia.data.corpus import Document, builtin_documents, split_documents
from myopia.data.tokenizer import (
    build_tokenizer,
    byte_tokenizer,
    gpt2_tokenizer,
    train_bpe,
)
from myopia.tasks.text import TextConfig, TextTask


def test_builtin_corpus_is_shipped_and_split_by_document():
    docs = builtin_documents()
    assert len(docs) > 1000 and {d.source for d in docs} == {"sotu", "moby-dick", "shakespeare", "kjv-bible"}
    train, held = split_documents(docs, 0.05)
    assert 0.03 < len(held) / len(docs) < 0.07
    train_ids = {(d.source, d.title) for d in train}
    assert not train_ids & {(d.source, d.title) for d in held}  # no document on both sides
    # The split is stable: a document's side does not depend on the others.
    train2, held2 = split_documents(docs[::-1], 0.05)
    assert {(d.source, d.title) for d in held2} == {(d.source, d.title) for d in held}


def test_heldout_windows_come_only_from_heldout_documents(tmp_path):
    docs = [Document("t", f"doc{i}", f"Document {i}. " + "lorem ipsum dolor sit amet " * 20) for i in range(40)]
    folder = tmp_path / "corpus"
    folder.mkdir()
    for d in docs:
        (folder / f"{d.title}.txt").write_text(d.text)
    task = TextTask(TextConfig(corpus=str(folder), tokenizer="byte", seq_len=16, cache_dir=str(tmp_path / "c")), 0)
    held_titles = set(task.heldout_titles)
    assert held_titles and len(held_titles) < 40
    for x, y, doc_ids in task.heldout_all(8):
        for row, d in zip(x, doc_ids):
            text = bytes(row.tolist()).decode()
            assert text in (folder / task.heldout_titles[int(d)]).read_text()
    # no training window text comes from a held-out document's unique header
    train_text = bytes(task.train.tokens.tolist()).decode()
    for t in held_titles:
        assert f"Document {t.removeprefix('doc').removesuffix('.txt')}." not in train_text


def test_token_cache_round_trips_text(tmp_path):
    tok = gpt2_tokenizer()
    texts = ["Hello world, this is a test.", "Second document: numbers 12345 and ünïcödé."]
    arr = load_or_build(str(tmp_path / "c.bin"), "k1", texts, tok.encode_batch, tok.vocab_size, log=lambda m: None)
    assert arr.n_docs == 2
    for d, text in enumerate(texts):
        ids = arr.tokens[arr.doc_offsets[d]:arr.doc_offsets[d + 1]]
        assert tok.decode(ids.tolist()) == text
    assert tok.encode_batch(["Hello world"])[0] == [15496, 995]  # GPT-2's ids


def test_gpt_neox_tokenizer_gives_pythias_ids():
    """The shipped GPT-NeoX-20B tokenizer (Pythia's): its ids, its whitespace tokens, no extra specials."""
    tok = build_tokenizer("gpt-neox", 0, [], "")
    assert tok.vocab_size == 50277  # Pythia's embeddings (50304 rows) hold every id
    assert tok.encode_batch(["Hello world"])[0] == [12092, 1533]  # GPT-2 gives [15496, 995]
    assert tok.encode_batch(["a" + " " * 24 + "b"])[0] == [66, 50254, 67]  # runs of spaces are single tokens
    text = "Héllo  wörld,\n\n  indented: 3.14159"
    assert tok.decode(tok.encode_batch([text])[0]) == text


def test_corrupt_and_stale_caches_are_rebuilt_with_a_message(tmp_path):
    tok = byte_tokenizer()
    path = str(tmp_path / "c.bin")
    texts = ["abcdefgh" * 10, "ijklmnop" * 10]
    messages = []
    load_or_build(path, "k1", texts, tok.encode_batch, 256, log=messages.append)
    assert messages == []
    load_or_build(path, "k1", texts, tok.encode_batch, 256, log=messages.append)
    assert messages == []  # a good cache is reused
    with open(path, "r+b") as f:  # flip a token byte
        f.seek(HEADER_BYTES + 8 * 3 + 5)
        f.write(b"Z")
    arr = load_or_build(path, "k1", texts, tok.encode_batch, 256, log=messages.append)
    assert "checksum" in messages[-1] and bytes(arr.tokens[:8].tolist()) == b"abcdefgh"
    with open(path, "r+b") as f:  # a torn write
        f.truncate(os.path.getsize(path) - 7)
    load_or_build(path, "k1", texts, tok.encode_batch, 256, log=messages.append)
    assert "size" in messages[-1]
    load_or_build(path, "k2", texts, tok.encode_batch, 256, log=messages.append)
    assert "another corpus or tokenizer" in messages[-1]
    with open(path, "r+b") as f:  # an old format version
        header = json.loads(f.read(HEADER_BYTES).rstrip(b"\0"))
        header["version"] = 0
        raw = json.dumps(header).encode()
        f.seek(0)
        f.write(raw + b"\0" * (HEADER_BYTES - len(raw)))
    load_or_build(path, "k2", texts, tok.encode_batch, 256, log=messages.append)
    assert "version 0" in messages[-1]


def test_trained_bpe_is_cached_and_reused(tmp_path):
    docs = [Document("t", str(i), "the cat sat on the mat and the dog sat on the log " * 5) for i in range(20)]
    path = str(tmp_path / "bpe.json")
    a = train_bpe(docs, 300, path)
    b = train_bpe(docs, 300, path)
    assert a.fingerprint == b.fingerprint and a.vocab_size <= 300
    ids = a.encode_batch(["the cat sat"])[0]
    assert a.decode(ids) == "the cat sat"
