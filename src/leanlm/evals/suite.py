"""Run a set of evaluations on one model and report them as JSON and a markdown table."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from leanlm.errors import LeanLMError
from leanlm.evals.perplexity import boolq_passages, perplexity
from leanlm.evals.scorer import LoglikelihoodScorer, score_lambada, score_multiple_choice
from leanlm.evals.tasks import ALL_TASKS, MC_TASKS, load_task

PPL_SOURCES = ("boolq-passages",)


def parse_tasks(spec: str) -> list[str]:
    names = [t.strip() for t in spec.split(",") if t.strip()]
    if names == ["all"]:
        return list(ALL_TASKS)
    bad = [t for t in names if t not in ALL_TASKS and t not in PPL_SOURCES]
    if bad or not names:
        raise LeanLMError(f"unknown task(s) {bad or spec!r}. Fix: --tasks takes a comma-separated list of "
                          f"{', '.join(ALL_TASKS + PPL_SOURCES)} (or all)")
    return names


def run_suite(model, tokenizer, tasks: list[str], limit: int | None, batch_size: int = 16,
              progress: bool = True) -> dict[str, Any]:
    """Scores of `model` on each task (first `limit` documents); perplexity sources are limited to `limit` texts."""
    scorer = LoglikelihoodScorer(model, tokenizer, batch_size=batch_size, progress=progress)
    results: dict[str, Any] = {}
    for name in tasks:
        t0 = time.perf_counter()
        if name in MC_TASKS:
            res = score_multiple_choice(scorer, load_task(name, limit), desc=name)
        elif name == "lambada":
            res = score_lambada(scorer, load_task(name, limit))
        else:

            res = perplexity(model, tokenizer, boolq_passages(limit), batch_size=batch_size, progress=progress)
        res["seconds"] = time.perf_counter() - t0
        results[name] = res
    return results


def markdown_table(results: dict[str, Any]) -> str:
    lines = ["| task | n | acc | acc_per_char | acc_per_token | ppl | bits/byte |", "|---|---|---|---|---|---|---|"]
    fmt = lambda v: "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    for name, r in results.items():
        lines.append(f"| {name} | {r.get('n', r.get('tokens', ''))} | {fmt(r.get('acc'))} | {fmt(r.get('acc_per_char'))} "
                     f"| {fmt(r.get('acc_per_token'))} | {fmt(r.get('ppl'))} | {fmt(r.get('bits_per_byte'))} |")
    return "\n".join(lines)


def write_results(results: dict[str, Any], out: Path, meta: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown_table(results) + "\n")
