"""Log-likelihood scoring of (context, continuation) pairs, batched, for any causal LM (leanlm or Hugging Face).

Tokenization follows lm-eval-harness: the continuation's tokens are those of `tokenize(context + continuation)`
after the tokens of `tokenize(context)` (so a word split across the boundary is scored as the model would see
it); when the context's tokens are not a prefix of the whole, context and continuation are tokenized separately.
Over-long inputs lose tokens from the left of the context. Requests are sorted by length and right-padded into
batches; each result is the summed log-probability of the continuation tokens, whether every one of them is the
greedy (argmax) choice, and the continuation's length in tokens, characters and UTF-8 bytes.

Multiple-choice metrics (`score_multiple_choice`): `acc` (highest summed log-likelihood), `acc_per_char`
(log-likelihood divided by the continuation's characters; OLMES's `acc_per_char`, lm-eval's `acc_norm` up to
byte/char), `acc_per_token` (divided by its tokens). LAMBADA (`score_lambada`): `acc` = the last word is the
greedy continuation, `ppl` = exp(-mean log-likelihood of the word).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from leanlm.evals.tasks import Doc


@dataclass(frozen=True)
class Score:
    logprob: float
    greedy: bool
    tokens: int
    chars: int
    bytes: int


class LoglikelihoodScorer:
    """Scores continuations under `model` (eval mode, no grad)."""

    def __init__(self, model, tokenizer, batch_size: int = 16, max_length: int | None = None,
                 progress: bool = True):
        self.model, self.tok, self.batch_size, self.progress = model, tokenizer, batch_size, progress
        self.max_length = max_length or getattr(model.config, "max_position_embeddings", 2048)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id \
            is not None else []

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context tokens, continuation tokens) as lm-eval-harness splits them."""
        enc = lambda s: self.tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        ctx, whole = enc(context), enc(context + continuation)
        if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
            return self.bos + ctx, whole[len(ctx):]
        return self.bos + ctx, enc(continuation)

    @torch.no_grad()
    def score(self, pairs: list[tuple[str, str]], desc: str = "scoring") -> list[Score]:
        encoded = [self.encode_pair(c, x) for c, x in pairs]
        order = sorted(range(len(pairs)), key=lambda i: -(len(encoded[i][0]) + len(encoded[i][1])))
        results: list[Score | None] = [None] * len(pairs)
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        bar = tqdm(total=len(pairs), desc=desc, disable=not self.progress, leave=False)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            seqs, spans = [], []
            for i in idx:
                ctx, cont = encoded[i]
                seq = (ctx + cont)[-(self.max_length + 1):]
                seqs.append(seq[:-1])  # inputs; targets are seq[1:]
                spans.append((len(seq) - 1 - len(cont), seq))
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for r, s in enumerate(seqs):
                ids[r, : len(s)] = torch.tensor(s)
                mask[r, : len(s)] = 1
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # [B, W, V]
            for r, i in enumerate(idx):
                first, seq = spans[r]
                cont = encoded[i][1]
                target = torch.tensor(seq[first + 1 :], device=device)  # the continuation tokens
                rows = torch.log_softmax(logits[r, first : first + len(target)].float(), dim=-1)  # their predictions
                lp = rows.gather(-1, target[:, None])[:, 0].sum().item()
                greedy = bool((rows.argmax(-1) == target).all())
                text = pairs[i][1]
                results[i] = Score(lp, greedy, len(cont), len(text), len(text.encode("utf-8")))
            bar.update(len(idx))
        bar.close()
        self.model.train(was_training)
        return results  # type: ignore[return-value]


def score_multiple_choice(scorer: LoglikelihoodScorer, docs: list[Doc], desc: str = "") -> dict[str, float]:
    pairs = [(c, x) for d in docs for c, x in zip(d.contexts, d.continuations)]
    scores = scorer.score(pairs, desc=desc or "multiple choice")
    acc = acc_char = acc_tok = 0
    k = 0
    for d in docs:
        mine = scores[k : k + len(d.continuations)]
        k += len(d.continuations)
        pick = lambda vals: max(range(len(vals)), key=vals.__getitem__)  # noqa: E731 (first max wins ties)
        acc += pick([s.logprob for s in mine]) == d.gold
        acc_char += pick([s.logprob / max(1, s.chars) for s in mine]) == d.gold
        acc_tok += pick([s.logprob / max(1, s.tokens) for s in mine]) == d.gold
    n = len(docs)
    return {"acc": acc / n, "acc_per_char": acc_char / n, "acc_per_token": acc_tok / n, "n": n}


def score_lambada(scorer: LoglikelihoodScorer, docs: list[Doc]) -> dict[str, float]:
    scores = scorer.score([(d.contexts[0], d.continuations[0]) for d in docs], desc="lambada")
    n = len(docs)
    return {"acc": sum(s.greedy for s in scores) / n, "ppl": math.exp(-sum(s.logprob for s in scores) / n), "n": n}
