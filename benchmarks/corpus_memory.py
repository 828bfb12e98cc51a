"""Peak memory and speed of building the token cache (`leanlm.data.prepare_data`) for a large user corpus.

Makes a corpus of `--mb` megabytes from the bundled text (repeated, each copy a new document) in one of three shapes,
builds its cache in a child process (BPE trained on it, then tokenized), and reports the child's peak resident memory
(`ru_maxrss`), the wall time and tokens/s:

    folder   a folder of ~1 MB .txt files (one document each)
    single   one .txt file with its line breaks (cut into documents at blank lines)
    oneline  one .txt file on a single line (cut into documents at spaces)
    parquet  one parquet file, one row per ~64 kB chunk of text (column `text`, row groups of 256 rows)
    dataset  the same rows as a Hugging Face `datasets` folder written by `save_to_disk`

`--workers N` sets `data.workers` (0 = auto: one tokenizer process per core above 64 MB of text, the default).

    python benchmarks/corpus_memory.py --mb 200 --shape folder --shape single --shape oneline \\
        --out docs/results/corpus_memory.json

`--source PATH` measures an existing corpus instead, and `--code DIR` runs another checkout's leanlm (its `src/` on
PYTHONPATH) for a before/after comparison on the same input, e.g. `git worktree add /tmp/old 6add98b`, then
`--code /tmp/old --label before` and `--label after`. `--append` adds the rows to an existing `--out` file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import json, resource, sys, time
from leanlm.data import DataConfig, prepare_data
t = time.perf_counter()
data = prepare_data(DataConfig(source=sys.argv[1], seq_len=256, workers=int(sys.argv[2])), 8192)
print(json.dumps({"seconds": time.perf_counter() - t, "train_tokens": int(data.meta["train_tokens"]),
                  "val_tokens": int(data.meta["val_tokens"]), "docs": data.meta["train_docs"] + data.meta["val_docs"],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def make_corpus(root: Path, mb: int, shape: str) -> Path:
    """Bundled text repeated to `mb` megabytes, written as `shape` under `root` (reused if present)."""
    from leanlm.corpus import iter_documents

    names = {"folder": "docs", "parquet": "corpus.parquet", "dataset": "dataset"}
    target = root / f"{shape}-{mb}mb" / names.get(shape, "corpus.txt")
    if target.exists():
        return target
    base = "\n\n".join(d.text for d in iter_documents("bundled"))
    if shape in ("parquet", "dataset"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        parquet = target if shape == "parquet" else root / f"parquet-{mb}mb" / "corpus.parquet"
        if not parquet.exists():
            parquet.parent.mkdir(parents=True, exist_ok=True)
            with pq.ParquetWriter(str(parquet), pa.schema([("text", pa.string())])) as w:
                written, copy = 0, 0
                while written < mb * 1_000_000:
                    rows = [f"copy {copy} " + base[i:i + 65536] for i in range(0, len(base), 65536)]
                    for start in range(0, len(rows), 256):
                        w.write_table(pa.table({"text": rows[start:start + 256]}))
                    written += sum(map(len, rows))
                    copy += 1
        if shape == "dataset":
            import datasets

            datasets.Dataset.from_parquet(str(parquet), cache_dir=str(root / "hf-cache")).save_to_disk(str(target))
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    need, copy = mb * 1_000_000, 0
    if shape == "folder":
        target.mkdir()
        written = 0
        while written < need:
            for start in range(0, len(base), 1_000_000):
                piece = f"copy {copy}\n" + base[start:start + 1_000_000]
                (target / f"c{copy:03d}-{start // 1_000_000:03d}.txt").write_text(piece)
                written += len(piece)
                if written >= need:
                    break
            copy += 1
        return target
    with open(target, "w") as f:
        written = 0
        while written < need:
            text = f"copy {copy}\n\n" + base
            if shape == "oneline":
                text = " ".join(text.split()) + " "
            f.write(text[: need - written])
            written += len(text[: need - written])
            copy += 1
    return target


def measure(source: Path, cache: Path, code: str | None = None, workers: int = 0) -> dict:
    env = dict(os.environ, LEANLM_CACHE=str(cache), TOKENIZERS_PARALLELISM="true")
    if code:
        env["PYTHONPATH"] = str(Path(code).resolve() / "src")
    t = time.perf_counter()
    child = CHILD if code is None else CHILD.replace(", workers=int(sys.argv[2])", "")  # older code: no workers
    out = subprocess.run([sys.executable, "-c", child, str(source), str(workers)], env=env, capture_output=True,
                         text=True, check=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])  # the child's own peak resident memory (ru_maxrss)
    tokens = row["train_tokens"] + row["val_tokens"]
    row.update(wall_s=time.perf_counter() - t, tokens_per_s=tokens / row["seconds"])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--shape", action="append", choices=("folder", "single", "oneline", "parquet", "dataset"))
    ap.add_argument("--workers", type=int, default=0, help="data.workers (0 = auto)")
    ap.add_argument("--work", default=".cache/bench-corpus", help="where the corpora and their caches go")
    ap.add_argument("--out", default=None, help="JSON path (a .md table and a .png plot are written beside it)")
    ap.add_argument("--source", default=None, help="measure this corpus (a data.source path) instead")
    ap.add_argument("--code", default=None, help="a leanlm checkout whose src/ the child imports")
    ap.add_argument("--label", default="after", help="names this code version in the table")
    ap.add_argument("--append", action="store_true", help="add to the rows already in --out")
    args = ap.parse_args()
    work = Path(args.work)
    rows = json.loads(Path(args.out).read_text())["rows"] if args.append and args.out else []
    jobs = [(Path(args.source).name, Path(args.source))] if args.source else [
        (shape, make_corpus(work, args.mb, shape)) for shape in args.shape or ["folder", "single", "oneline"]]
    for shape, source in jobs:
        files = [source] if source.is_file() else [f for f in source.rglob("*") if f.is_file()]
        size = sum(f.stat().st_size for f in files)
        cache = work / f"cache-{shape}-{args.label}-{int(time.time())}"  # fresh: always a full build
        row = {"shape": shape, "code": args.label, "corpus_mb": size / 1e6, "workers": args.workers,
               **measure(source, cache, args.code, args.workers)}
        rows.append(row)
        print(f"{shape}: {row['corpus_mb']:.0f} MB, {row['docs']} documents, {row['train_tokens'] + row['val_tokens']:,}"
              f" tokens in {row['seconds']:.0f}s ({row['tokens_per_s']:,.0f} tokens/s), peak RSS "
              f"{row['peak_rss_mb']:,.0f} MB", flush=True)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"rows": rows}, indent=1))
        lines = ["| corpus | code | MB | documents | tokens | build s | tokens/s | peak RSS MB | worker peak RSS MB |",
                 "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['shape']} | {r.get('code', 'after')} | {r['corpus_mb']:.0f} | {r['docs']:,} | "
                  f"{r['train_tokens'] + r['val_tokens']:,} | {r['seconds']:.0f} | {r['tokens_per_s']:,.0f} | "
                  f"{r['peak_rss_mb']:,.0f} | {r.get('worker_peak_rss_mb', 0):,.0f} |" for r in rows]
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")
        plot(rows, out.with_suffix(".png"))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{r['shape']}\n{r['corpus_mb']:.0f} MB, {r.get('code', 'after')}" for r in rows]
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 3.6))
    bars = ax.bar(names, [r["peak_rss_mb"] for r in rows],
                  color=["#c44" if r.get("code") == "before" else "#48c" for r in rows])
    ax.bar_label(bars, fmt="%.0f")
    ax.set_ylabel("peak resident memory (MB)")
    ax.set_yscale("log")
    ax.set_title("building the token cache (BPE + tokenization)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
