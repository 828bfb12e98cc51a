"""Tokenized, packed, memory-mapped training data.

`prepare_data(cfg)` turns a corpus (see `leanlm.corpus`) into two flat token files under
`.cache/data/<key>/` (`train.bin`, `val.bin`, with an end-of-text token after every document), plus the tokenizer
(`tokenizer.json` etc., loadable with `AutoTokenizer.from_pretrained`). The split is by document: a document's
name decides, by a stable hash, whether all of it is validation text, so no document straddles the split.
The tokenizer is either a byte-level BPE trained here with the `tokenizers` library on the training documents
(`data.tokenizer: bpe`, vocabulary size = the model's `vocab_size`) or any pretrained tokenizer directory.
The cache key covers everything that changes the result, so a changed corpus or setting builds a new cache;
files are written to a temporary folder and renamed into place, so an interrupted build leaves nothing behind.

The build streams: documents are read one at a time (`leanlm.corpus.iter_documents`: one pass for the names that
decide the split, one to train the BPE, one to tokenize), and long documents are tokenized in pieces of at most
`TOKENIZE_CHARS` characters cut before a space that starts a word, which gives the same ids as tokenizing the whole
text for byte-level BPE tokenizers (GPT-2-style pre-tokenization never merges across such a point; tested). Memory
therefore stays flat in the corpus size (bounded by the largest single file; measured in docs/results/training.md).

Training reads fixed-length windows of `seq_len + 1` tokens (`TokenWindows`), in an order given by
`SampleOrder`: a seeded permutation per epoch, addressed by a global sample counter, which is all that a
checkpoint has to store to resume the data stream exactly.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import zlib
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from leanlm.corpus import Document, cache_root, iter_documents, source_parts
from leanlm.errors import ConfigError, DataError
from leanlm.lock import build_once

EOT = "<|endoftext|>"
FORMAT_VERSION = 2  # 2: a single-file source is cut into documents
TOKENIZE_CHARS = 1 << 18  # longest piece of text handed to the tokenizer at once
BATCH_CHARS = 1 << 20  # characters tokenized per batch (several pieces, so the tokenizer uses every core)


@dataclass
class DataConfig:
    """The `data:` section of a run config."""

    source: str = "bundled"  # bundled corpora, their names, or paths (comma-separated); see leanlm.corpus
    text_field: str = "text"  # field of a .jsonl source holding the text
    tokenizer: str = "bpe"  # "bpe" (trained here) or a local pretrained tokenizer directory
    seq_len: int = 256
    val_fraction: float = 0.05
    workers: int = 0  # tokenizer processes: 0 = auto (one per core above 64 MB of text), 1 = in this process


    def check(self) -> None:
        try:
            source_parts(self.source)
        except DataError as exc:
            raise ConfigError("data.source", str(exc).split(". Fix:")[0].removeprefix("data.source "),
                              "list corpora or paths separated by single commas, e.g. bundled") from None
        for name in ("text_field", "tokenizer"):
            if not str(getattr(self, name)).strip():
                raise ConfigError(f"data.{name}", "is empty", "use the default (text / bpe) or name one")
        if not 0 <= self.workers <= 256:
            raise ConfigError("data.workers", f"must be in [0, 256], got {self.workers}",
                              "use 0 (auto), 1 (this process) or a process count such as the number of cores")
        if self.seq_len <= 0:
            raise ConfigError("data.seq_len", f"must be > 0, got {self.seq_len}", "use e.g. 256")
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError("data.val_fraction", f"must be in (0, 0.5), got {self.val_fraction}", "use e.g. 0.05")


@dataclass
class PreparedData:
    dir: Path
    train: np.ndarray  # flat token ids (memory-mapped)
    val: np.ndarray
    tokenizer: "object"  # transformers.PreTrainedTokenizerFast
    meta: dict


def is_validation(doc_name: str, val_fraction: float) -> bool:
    """Stable document-level split: a document is validation text iff its name hashes below `val_fraction`."""
    return (zlib.crc32(doc_name.encode("utf-8")) % 10_000) < val_fraction * 10_000


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    train = [d for d in docs if not is_validation(d.name, val_fraction)]
    val = [d for d in docs if is_validation(d.name, val_fraction)]
    if not val:  # tiny corpora: hold out the last document
        train, val = train[:-1], train[-1:]
    if not train:
        raise DataError("the corpus has a single document, so nothing is left to train on after holding out "
                        "validation text. Fix: add documents (one per .txt file or .jsonl line)")
    return train, val


def _source_fingerprint(source: str) -> list:
    parts = []
    for part in (p.strip() for p in source.split(",")):
        path = Path(part).expanduser()
        if path.exists():
            files = sorted(path.rglob("*")) if path.is_dir() else [path]
            parts.append([str(path.resolve())] + [[str(f), f.stat().st_size, f.stat().st_mtime_ns]
                                                   for f in files if f.is_file()])
        else:
            parts.append(part)
    return parts


def train_bpe(docs, vocab_size: int):
    """A byte-level BPE with `EOT` as id 0, trained on the documents of iterable `docs` (long ones in pieces); returned
    as a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((piece for d in docs for piece in text_pieces(d.text)), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, bos_token=EOT, unk_token=None,
                                   pad_token=EOT, clean_up_tokenization_spaces=False)


def load_pretrained_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any loading failure is a config problem for the user
        raise ConfigError("data.tokenizer", f"cannot load a tokenizer from {path!r} ({exc})",
                          "use 'bpe' or a local directory holding tokenizer.json") from exc


def text_pieces(text: str, limit: int = TOKENIZE_CHARS) -> list[str]:
    """`text` cut into pieces of at most ~`limit` characters, each cut placed before a space that is followed by a
    non-space (so byte-level BPE gives the same ids piece by piece as for the whole text); a run without any such
    space is cut at `limit`."""
    pieces, start = [], 0
    while len(text) - start > limit:
        end, low = start + limit, start + limit // 2
        cut = text.rfind(" ", low, end)
        while cut > low and text[cut + 1 : cut + 2].isspace():
            cut = text.rfind(" ", low, cut)
        if cut <= low:
            cut = end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


AUTO_WORKERS_CHARS = 64 << 20  # above this much text, `workers: 0` tokenizes in one process per core

_worker_tokenizer = None  # the `tokenizers.Tokenizer` of a tokenizer worker process


def _init_worker(tokenizer_json: str) -> None:
    global _worker_tokenizer
    # A forked child must not use the tokenizers thread pool it inherited (it has no threads any more and would
    # hang); each worker is one process working sequentially.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _worker_tokenizer = Tokenizer.from_file(tokenizer_json)


def _encode_in_worker(pieces: list[str], ends: list[bool], eos: int, dtype: str) -> np.ndarray:
    """One batch's ids, an end-of-text id after each document's last piece (runs in a worker process)."""
    out = []
    for enc, last in zip(_worker_tokenizer.encode_batch(pieces, add_special_tokens=False), ends):
        out.append(np.asarray(enc.ids + [eos] if last else enc.ids, dtype=dtype))
    return np.concatenate(out) if out else np.zeros(0, dtype=dtype)


def _batches(docs, bar):
    """(pieces, ends) batches of about BATCH_CHARS characters from the documents of iterable `docs`."""
    pieces: list[str] = []
    ends: list[bool] = []  # whether pieces[i] is the last piece of its document
    size = 0
    for doc in docs:
        cut = text_pieces(doc.text)
        for i, piece in enumerate(cut):
            pieces.append(piece)
            ends.append(i == len(cut) - 1)
            size += len(piece)
            if size >= BATCH_CHARS:
                yield pieces, ends
                pieces, ends, size = [], [], 0
        bar.update(1)
    if pieces:
        yield pieces, ends


def _write_tokens(path: Path, docs, tokenizer, dtype, desc: str = "tokenize", workers: int = 1,
                  tokenizer_json: Path | None = None) -> int:
    """Tokenize the documents of iterable `docs` into flat file `path` (an end-of-text id after each document), in
    batches of about BATCH_CHARS characters, in this process or in `workers` processes (forked, each loading
    `tokenizer_json`; at most 2 batches per worker in flight, written in order, so memory stays bounded); returns
    the token count."""
    from tqdm.auto import tqdm

    eos = tokenizer.eos_token_id
    dtype_name = np.dtype(dtype).name
    total = 0
    with open(path, "wb") as f, tqdm(desc=desc, unit="doc", leave=False, disable=None) as bar:
        if workers <= 1 or tokenizer_json is None:
            for pieces, ends in _batches(docs, bar):
                arr = [np.asarray(ids + [eos] if last else ids, dtype=dtype)
                       for ids, last in zip(tokenizer(pieces, add_special_tokens=False)["input_ids"], ends)]
                for a in arr:
                    f.write(a.tobytes())
                    total += a.size
            return total

        # fork: the workers start at once and share the parent's pages; they only run the Rust tokenizer
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_init_worker,
                                 initargs=(str(tokenizer_json),)) as pool:
            pending: deque = deque()
            for pieces, ends in _batches(docs, bar):
                pending.append(pool.submit(_encode_in_worker, pieces, ends, eos, dtype_name))
                while len(pending) >= 2 * workers:
                    arr = pending.popleft().result()
                    f.write(arr.tobytes())
                    total += arr.size
            while pending:
                arr = pending.popleft().result()
                f.write(arr.tobytes())
                total += arr.size
    return total


def prepare_data(cfg: DataConfig, vocab_size: int) -> PreparedData:
    """Build (or reuse) the token cache for `cfg`; `vocab_size` is the model's."""
    cfg.check()
    key_src = {"version": FORMAT_VERSION, "source": _source_fingerprint(cfg.source), "text_field": cfg.text_field,
               "tokenizer": cfg.tokenizer if cfg.tokenizer == "bpe" else str(Path(cfg.tokenizer).resolve()),
               "vocab_size": vocab_size if cfg.tokenizer == "bpe" else None, "val_fraction": cfg.val_fraction}
    key = hashlib.sha1(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
    out = cache_root() / "data" / key
    # two processes preparing the same data: one builds, the other waits and reads
    build_once(out, lambda: (out / "meta.json").exists(), lambda: _build(cfg, vocab_size, out, key_src))
    meta = json.loads((out / "meta.json").read_text())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    dtype = np.dtype(meta["dtype"])
    train = np.memmap(out / "train.bin", dtype=dtype, mode="r")
    val = np.memmap(out / "val.bin", dtype=dtype, mode="r")
    if len(tokenizer) > vocab_size:
        raise ConfigError("vocab_size", f"the tokenizer has {len(tokenizer)} tokens but the model only "
                          f"{vocab_size}", f"set model.vocab_size to at least {len(tokenizer)}")
    for name, arr in (("training", train), ("validation", val)):
        if arr.size < cfg.seq_len + 1:
            raise DataError(f"the {name} split has {arr.size} tokens, fewer than one sequence of data.seq_len + 1 = "
                            f"{cfg.seq_len + 1}. Fix: lower data.seq_len or add text")
    return PreparedData(out, train, val, tokenizer, meta)


def split_names(names: list[str], val_fraction: float) -> set[str]:
    """The validation documents among `names` (in corpus order), by the same rule as `split_documents`."""
    val = {n for n in names if is_validation(n, val_fraction)}
    if not val and names:
        val = {names[-1]}
    if len(val) >= len(set(names)):
        raise DataError("the corpus has a single document, so nothing is left to train on after holding out "
                        "validation text. Fix: add documents (one per .txt file or .jsonl line), or pass a single "
                        ".txt file as data.source (it is cut into documents)")
    return val


def _build(cfg: DataConfig, vocab_size: int, out: Path, key_src: dict) -> None:
    def docs():
        return iter_documents(cfg.source, cfg.text_field)

    names, chars = [], 0
    for d in docs():  # pass 1: names and sizes only (one document in memory at a time)
        names.append(d.name)
        chars += len(d.text)
    if not names:
        raise DataError(f"data.source {cfg.source!r} holds no text. Fix: point it at non-empty UTF-8 documents")
    val_names = split_names(names, cfg.val_fraction)

    def train_docs():
        return (d for d in docs() if d.name not in val_names)

    def val_docs():
        return (d for d in docs() if d.name in val_names)

    if cfg.tokenizer == "bpe":
        tokenizer = train_bpe(train_docs(), vocab_size)
    else:
        tokenizer = load_pretrained_tokenizer(cfg.tokenizer)
    dtype = np.uint16 if len(tokenizer) <= 65535 else np.uint32
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        tokenizer.save_pretrained(str(tmp))
        workers = cfg.workers or ((os.cpu_count() or 1) if chars > AUTO_WORKERS_CHARS else 1)
        fast = tmp / "tokenizer.json" if (tmp / "tokenizer.json").exists() else None  # slow tokenizers: in process
        n_train = _write_tokens(tmp / "train.bin", train_docs(), tokenizer, dtype, "tokenize train", workers, fast)
        n_val = _write_tokens(tmp / "val.bin", val_docs(), tokenizer, dtype, "tokenize val", min(workers, 2), fast)
        val_list = [n for n in names if n in val_names]
        meta = {**key_src, "dtype": np.dtype(dtype).name, "train_tokens": n_train, "val_tokens": n_val,
                "train_docs": len(names) - len(val_list), "val_docs": len(val_list),
                "val_doc_names": val_list, "vocab": len(tokenizer),
                "data_config": asdict(cfg)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            tmp.rename(out)
        except OSError:  # another process built the same cache meanwhile
            if not (out / "meta.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class TokenWindows:
    """Non-overlapping windows of `seq_len + 1` tokens over a flat token array: item i is tokens[i*L : i*L+L+1]."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.n = (tokens.size - 1) // seq_len

    def __len__(self) -> int:
        return self.n

    def spread(self, count: int) -> np.ndarray:
        """Indices of `count` windows (at most all of them) spread evenly over the array: the fixed evaluation
        subset, shared by the trainer's validation and `leanlm eval` so both score the same windows."""
        n = min(self.n, count)
        return np.linspace(0, self.n - 1, n).round().astype(np.int64)

    def batch(self, indices: list[int] | np.ndarray) -> torch.Tensor:
        """Windows `indices` stacked as int64 [len(indices), seq_len + 1]."""
        L = self.seq_len
        rows = [np.asarray(self.tokens[i * L : i * L + L + 1], dtype=np.int64) for i in indices]
        return torch.from_numpy(np.stack(rows))


class SampleOrder:
    """Deterministic infinite stream of window indices: epoch e is a permutation seeded by (seed, e).

    `indices(start, count)` gives samples start .. start+count-1 of the stream, so a resumed run continues exactly
    where it stopped given only the global sample counter.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._perm_epoch, self._perm = -1, np.arange(0)

    def _epoch(self, e: int) -> np.ndarray:
        if e != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, e]).permutation(self.n)
            self._perm_epoch = e
        return self._perm

    def indices(self, start: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.int64)
        for j in range(count):
            k = start + j
            out[j] = self._epoch(k // self.n)[k % self.n]
        return out
