"""User corpora at scale: parquet files and folders, Hugging Face `datasets` folders written by `save_to_disk`
(read with pyarrow, no hub), and tokenization in worker processes (identical to tokenizing in this process)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from leanlm.corpus import load_documents
from leanlm.data import DataConfig, _write_tokens, prepare_data, train_bpe
from leanlm.errors import ConfigError, DataError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def texts(corpus_dir: Path) -> list[str]:
    return [p.read_text() for p in sorted(corpus_dir.glob("*.txt"))]


def test_parquet_file_and_folder(corpus_dir, tmp_path):
    rows = texts(corpus_dir)
    pq.write_table(pa.table({"body": rows, "id": list(range(len(rows)))}), tmp_path / "a.parquet", row_group_size=7)
    docs = load_documents(str(tmp_path / "a.parquet"), text_field="body")
    assert [d.name for d in docs] == [f"a.parquet:{i}" for i in range(len(rows))]
    assert [d.text.split() for d in docs] == [r.split() for r in rows]
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    pq.write_table(pa.table({"body": rows[:5]}), folder / "sub" / "b.parquet")
    (folder / "c.txt").write_text("a text file beside the parquet one\n")
    names = [d.name for d in load_documents(str(folder), text_field="body")]
    assert names == ["c.txt"] + [f"sub/b.parquet:{i}" for i in range(5)]
    with pytest.raises(DataError, match="no column 'text'"):
        load_documents(str(tmp_path / "a.parquet"))
    with pytest.raises(DataError, match="holds int"):
        load_documents(str(tmp_path / "a.parquet"), text_field="id")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable parquet"):
        load_documents(str(tmp_path / "bad.parquet"))


def test_datasets_save_to_disk_folders(corpus_dir, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = texts(corpus_dir)
    datasets.Dataset.from_dict({"text": rows}).save_to_disk(str(tmp_path / "ds"), num_shards=3)
    docs = load_documents(str(tmp_path / "ds"))
    assert len(docs) == len(rows) and [d.text.split() for d in docs] == [r.split() for r in rows]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": rows[:10]}),
                          "test": datasets.Dataset.from_dict({"text": rows[10:12]})}).save_to_disk(str(tmp_path / "dd"))
    docs = load_documents(str(tmp_path / "dd"))  # the train split only
    assert [d.text.split() for d in docs] == [r.split() for r in rows[:10]]
    data = prepare_data(DataConfig(source=str(tmp_path / "ds"), seq_len=32, val_fraction=0.1), 384)
    assert data.meta["train_docs"] + data.meta["val_docs"] == len(rows) and data.meta["val_docs"] >= 1
    (tmp_path / "ds" / "state.json").write_text("{")
    with pytest.raises(DataError, match="not a readable `datasets` folder"):
        load_documents(str(tmp_path / "ds"))


def test_worker_processes_tokenize_identically(corpus_dir, tmp_path):
    docs = load_documents(str(corpus_dir))
    tok = train_bpe(docs, 384)
    tok.save_pretrained(str(tmp_path / "tok"))
    one = _write_tokens(tmp_path / "one.bin", iter(docs), tok, np.uint16, workers=1)
    two = _write_tokens(tmp_path / "two.bin", iter(docs), tok, np.uint16, workers=2,
                        tokenizer_json=tmp_path / "tok" / "tokenizer.json")
    assert one == two > 0
    assert (tmp_path / "one.bin").read_bytes() == (tmp_path / "two.bin").read_bytes()
    with pytest.raises(ConfigError, match="data.workers"):
        DataConfig(workers=-1).check()


def test_workers_do_not_hang_after_the_parent_used_tokenizer_threads(tmp_path, corpus_dir):
    """Forked workers inherit the parent's tokenizers thread pool without its threads; with
    TOKENIZERS_PARALLELISM=true and the pool used (BPE training does), they would hang unless they run sequentially."""
    import os
    import subprocess
    import sys

    script = f"""
import numpy as np
from pathlib import Path
from leanlm.corpus import load_documents
from leanlm.data import _write_tokens, train_bpe
docs = load_documents({str(corpus_dir)!r}) * 10
tok = train_bpe(docs, 384)
tok.save_pretrained({str(tmp_path / 'tok')!r})
tok(["warm the thread pool " * 500] * 8)
n = _write_tokens(Path({str(tmp_path / 'x.bin')!r}), iter(docs), tok, np.uint16, workers=2,
                  tokenizer_json=Path({str(tmp_path / 'tok' / 'tokenizer.json')!r}))
print("tokens", n)
"""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="true")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "tokens" in out.stdout, out.stderr[-2000:]
