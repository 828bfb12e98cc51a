"""Long-context evaluation: a deterministic RULER-style task generator over the bundled text, and perplexity by
position bucket.

Tasks (each sample is a haystack of real prose with something planted in it, then a question whose answer is a
short continuation):
  passkey            a 5-digit pass key planted once; "What is the pass key? The pass key is" -> " 48213"
  niah_single        one "special magic number" for a keyword (RULER S-NIAH)
  niah_multikey      four magic numbers for four keywords; asked for one (RULER MK-NIAH)
  mqar               multi-query associative recall: six "key: value" pairs scattered, three keys asked at once
  variable_tracking  VAR chain (X1 = 12345, X2 = X1, ...) scattered; list every variable holding the value
  copy               a 12-word excerpt planted; its first 6 words are repeated at the end, the model must continue
                     with the other 6 (induction: the one task small base models trained on plain prose can pass)

Scoring is exact match: every answer token must be the model's greedy (argmax) choice given the prompt and the
answer tokens before it, which is exactly "greedy decoding produces the answer", computed in one forward pass.
The mean answer log-probability per token is reported too: it separates models that all score zero.
Works for leanlm and Hugging Face models: prompts are text and the model's own tokenizer measures lengths.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from leanlm.corpus import load_documents
from leanlm.data import split_documents
from leanlm.evals.scorer import LoglikelihoodScorer

TASKS = ("passkey", "niah_single", "niah_multikey", "mqar", "variable_tracking", "copy")
KEYWORDS = ("amber", "falcon", "harbor", "juniper", "lantern", "meadow", "nickel", "orchid", "pepper", "quartz",
            "raven", "saffron", "thistle", "velvet", "willow", "zephyr", "cobalt", "ember", "glacier", "hazel")


@dataclass(frozen=True)
class Sample:
    task: str
    prompt: str  # haystack with the planted facts, then the question
    answer: str  # the exact continuation expected (starts with a space)
    depth: float  # where the (first) planted fact sits, as a fraction of the haystack


def default_filler(val_fraction: float = 0.05) -> list[str]:
    """Sentences of the bundled corpus's validation documents (text no leanlm model was trained on)."""

    _, val = split_documents(load_documents("bundled"), val_fraction)
    return sentences(" ".join(d.text for d in val))


def sentences(text: str) -> list[str]:
    """Rough sentence split of prose (enough for haystacks)."""
    out, cur = [], []
    for word in text.split():
        cur.append(word)
        if word[-1] in ".!?" and len(cur) > 3:
            out.append(" ".join(cur))
            cur = []
    return out


class Generator:
    """Builds samples of about `length` tokens (measured with `tokenizer`) from `filler` sentences."""

    def __init__(self, tokenizer, filler: list[str] | None = None):
        self.tok = tokenizer
        self.filler = filler if filler is not None else default_filler()
        if len(self.filler) < 50:
            raise ValueError("long-context filler needs at least 50 sentences")
        self._lengths = np.array([len(self._enc(" " + s)) for s in self.filler])

    def _enc(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _haystack(self, rng: random.Random, budget: int) -> list[str]:
        start = rng.randrange(len(self.filler))
        out, used, i = [], 0, start
        while used + int(self._lengths[i % len(self.filler)]) <= budget or len(out) < 2:
            out.append(self.filler[i % len(self.filler)])
            used += int(self._lengths[i % len(self.filler)])
            i += 1
        return out

    def _plant(self, rng: random.Random, hay: list[str], needles: list[str], spread: bool) -> float:
        """Insert needles (in order) into the haystack; returns the first one's depth."""
        n = len(hay)
        if spread and n - 1 >= len(needles):
            slots = sorted(rng.sample(range(1, n), len(needles)))
        elif spread:  # short haystack: some needles share a gap
            slots = sorted(rng.randrange(1, n) for _ in needles)
        else:
            first = rng.randrange(1, max(2, n - 1))
            slots = [first] * len(needles)
        for k, (slot, needle) in enumerate(zip(slots, needles)):
            hay.insert(slot + k, needle)
        return slots[0] / n

    def sample(self, task: str, length: int, seed: int) -> Sample:
        rng = random.Random(f"{task}/{length}/{seed}")
        num = lambda digits: str(rng.randrange(10 ** (digits - 1), 10 ** digits))  # noqa: E731
        words = rng.sample(KEYWORDS, 6)
        if task == "passkey":
            key = num(5)
            needles = [f"The pass key is {key}. Remember it. {key} is the pass key."]
            question, answer = "What is the pass key? The pass key is", f" {key}"
        elif task == "niah_single":
            key = num(7)
            needles = [_magic_needle(words[0], key)]
            question, answer = _magic_question(words[0]), f" {key}"
        elif task == "niah_multikey":
            keys = [num(7) for _ in range(4)]
            needles = [_magic_needle(w, k) for w, k in zip(words, keys)]
            ask = rng.randrange(4)
            question, answer = _magic_question(words[ask]), f" {keys[ask]}"
        elif task == "mqar":
            vals = [num(4) for _ in range(6)]
            needles = [f"{w}: {v}." for w, v in zip(words, vals)]
            asked = sorted(rng.sample(range(6), 3))
            question = "The values of " + ", ".join(words[i] for i in asked) + " are"
            answer = " " + ", ".join(vals[i] for i in asked)
        elif task == "variable_tracking":
            value, chain = num(5), [f"X{rng.randrange(10, 99)}" for _ in range(4)]
            needles = [f"VAR {chain[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
            question = f"Find all variables that are assigned the value {value}. Answer: the variables are"
            answer = " " + " ".join(chain)
        elif task == "copy":
            src = self.filler[rng.randrange(len(self.filler))].split() + self.filler[rng.randrange(len(self.filler))].split()
            start = rng.randrange(max(1, len(src) - 12))
            excerpt = src[start:start + 12]
            while len(excerpt) < 12:
                excerpt.append(rng.choice(KEYWORDS))
            needles = [" ".join(excerpt)]
            question, answer = " ".join(excerpt[:6]), " " + " ".join(excerpt[6:])
        else:
            raise ValueError(f"unknown long-context task {task!r}; use one of {', '.join(TASKS)}")
        overhead = sum(len(self._enc(" " + s)) for s in needles + [question]) + len(self._enc(answer))
        hay = self._haystack(rng, max(0, length - overhead))
        depth = self._plant(rng, hay, needles, spread=task in ("niah_multikey", "mqar", "variable_tracking"))
        return Sample(task, " ".join(hay) + "\n" + question, answer, depth)

    def samples(self, task: str, length: int, n: int, seed: int = 0) -> list[Sample]:
        return [self.sample(task, length, seed * 100_003 + i) for i in range(n)]


def _magic_needle(word: str, number: str) -> str:
    return f"One of the special magic numbers for {word} is: {number}."


def _magic_question(word: str) -> str:
    """RULER's S-NIAH/MK-NIAH question, ending where the number is to be continued."""
    return (f"What is the special magic number for {word} mentioned in the provided text? "
            f"The special magic number for {word} mentioned in the provided text is")


def evaluate_longctx(model, tokenizer, tasks: list[str], lengths: list[int], n: int, seed: int = 0,
                     batch_size: int = 4, filler: list[str] | None = None, progress: bool = True) -> list[dict]:
    """Exact match and answer log-probability per (task, length); one row each."""
    gen = Generator(tokenizer, filler)
    rows = []
    for length in lengths:
        scorer = LoglikelihoodScorer(model, tokenizer, batch_size=batch_size, max_length=length + 64,
                                     progress=progress)
        for task in tasks:
            samples = gen.samples(task, length, n, seed)
            scores = scorer.score([(s.prompt, s.answer) for s in samples], desc=f"{task}@{length}")
            rows.append({
                "task": task, "length": length, "n": n,
                "exact_match": sum(s.greedy for s in scores) / n,
                "answer_logprob_per_token": sum(s.logprob / s.tokens for s in scores) / n,
                "prompt_tokens": float(np.mean([len(gen._enc(s.prompt)) for s in samples])),
            })
    return rows


@torch.no_grad()
def position_perplexity(model, tokens: np.ndarray, length: int, windows: int, buckets: list[int],
                        batch_size: int = 4, progress: bool = True) -> list[dict]:
    """Perplexity of the next-token predictions in position buckets [b_i, b_{i+1}) of `windows` evenly spread,
    non-overlapping windows of `length` tokens of `tokens` (each window starts a fresh context at position 0)."""
    if len(tokens) < length + 1:
        raise ValueError(f"need at least {length + 1} tokens for windows of {length}")
    starts = np.linspace(0, len(tokens) - length - 1, windows).astype(np.int64)
    device = next(model.parameters()).device
    nll = torch.zeros(length, dtype=torch.float64)
    for i in tqdm(range(0, windows, batch_size), desc=f"ppl@{length}", disable=not progress, leave=False):
        batch = np.stack([tokens[s:s + length + 1] for s in starts[i:i + batch_size]]).astype(np.int64)
        x = torch.from_numpy(batch).to(device)
        logits = model(input_ids=x[:, :-1], use_cache=False).logits.float()  # [B, L, V]
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")  # [B, L]
        nll += loss.double().sum(0).cpu()
    nll /= windows
    edges = [b for b in buckets if b < length] + [length]
    return [{"from": a, "to": b, "ppl": math.exp(float(nll[a:b].mean()))} for a, b in zip(edges, edges[1:])]
