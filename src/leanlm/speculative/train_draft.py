"""Training an EAGLE draft head: teacher-forced target features over token sequences, then a small training loop.

Data: the target's own greedy answers to prompts in its chat format (`answer_with_features`, cached by
`build_feature_cache`), so the head learns the distribution it will be asked to predict; or conversations whose
tokens are given (ShareGPT, `build_conversation_cache`), one teacher-forced forward each. `collect_features` runs the
target once over each sequence and keeps its last-layer features (fp16) with the tokens. Every sequence carries an
answer mask (`answer_mask`): the loss is on the predictions of answer tokens only.

Loss (EAGLE-1): for pair j = (feature j, token j+1) the head predicts feature j+1; regression loss smooth-L1 against
the target's feature, plus `cls_weight` (0.1) times a token loss on the LM head's prediction for token j+2 (over the
head's draft vocabulary when it has one). `cls_target` says what the token loss scores against, which the EAGLE-1
paper leaves ambiguous (its text speaks of a cross-entropy "of the token"; its released training code scores against
the target's distribution, the softmax of the LM head over the target's feature); all three readings are options:

    "greedy" (default)  cross-entropy against the target's top-1 among the draft ids (argmax of its LM head over the
                        cached feature j+1): what greedy verification accepts
    "target"            the KL divergence from the target's next-token distribution over the draft ids (renormalised)
                        to the head's: distillation, as EAGLE's code
    "data"              cross-entropy against the data's token j+2 (an answer token outside the draft vocabulary is
                        left out)

On text the target did not write (ShareGPT's answers are ChatGPT's) the data's token is often not the target's
argmax, so "data" teaches text that verification rejects; on the target's own greedy answers "greedy" and "data"
agree. Between "greedy" and "target" the default follows a measurement (docs/results/draft-head.md: at equal
data and steps, "greedy" gave higher accuracy at every drafting depth, most at depths 2-3).

Uniform noise U(-a, a) on the input features, with a = `noise` (0.1, EAGLE's value) times the features' RMS, makes
the head robust to its own errors at draft time. The reduced draft vocabulary (FR-Spec) is chosen by
`select_draft_vocab` from `answer_token_counts`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from leanlm.cache import LeanCache
from leanlm.checkpoint import atomic_write_file, atomic_write_text
from leanlm.errors import LeanLMError
from leanlm.schedule import lr_lambda
from leanlm.rope import Positions
from leanlm.speculative.draft import EagleDraftHead, lm_head_rows
from leanlm.speculative.prompts import encode_chat


CLS_TARGETS = ("target", "greedy", "data")  # what EAGLE-1's token loss scores against (`draft_loss`)


@dataclass
class DraftTrainConfig:
    epochs: int = 2
    lr: float = 1e-3
    batch_tokens: int = 4096
    cls_weight: float = 0.1
    cls_target: str = "greedy"  # EAGLE-1's token loss against: the target's top-1, its distribution, or the data
    noise: float = 0.1
    seed: int = 0
    max_len: int = 512
    bf16: bool = False  # autocast to bfloat16 (on CPU it recasts the frozen LM head every call: slower there)
    max_context: int | None = None  # prompt tokens kept before each answer (None = all)
    ttt_steps: int = 0  # EAGLE-3's training-time test: extra steps fed the head's own features (0 = EAGLE-1)
    ttt_weight: float = 1.0  # weight of each extra step's loss against the teacher-forced step's

    def __post_init__(self) -> None:
        if self.cls_target not in CLS_TARGETS:
            raise LeanLMError(f"cls_target {self.cls_target!r} is unknown. Fix: use one of {', '.join(CLS_TARGETS)}")


@torch.no_grad()
def collect_features(model, sequences: list[list[int]], batch_size: int = 4, progress: bool = True,
                     feature_layers: tuple[int, ...] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens [T] long, features [T, C] fp16) per sequence: the target's last hidden state at every position (with
    `feature_layers`: EAGLE-3's features, see `pick_features`)."""
    out = []
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    result: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for start in tqdm(range(0, len(order), batch_size), desc="target features", disable=not progress, leave=False):
        idx = order[start:start + batch_size]
        width = max(len(sequences[i]) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, : len(sequences[i])] = torch.tensor(sequences[i])
            mask[r, : len(sequences[i])] = 1
        hidden = pick_features(model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     output_hidden_states=True, use_cache=False).hidden_states, feature_layers)
        for r, i in enumerate(idx):
            n = len(sequences[i])
            result[i] = (ids[r, :n].clone(), hidden[r, :n].to(torch.float16).cpu())
    out = [result[i] for i in range(len(sequences))]
    return out


DraftSequence = tuple  # (tokens [T] long, features [T, C], answer mask [T] bool | prompt length int | absent)


def pick_features(hidden_states: tuple[torch.Tensor, ...], feature_layers: tuple[int, ...] | None) -> torch.Tensor:
    """What a feature cache stores per token, from a forward's `hidden_states` (HF convention: index k = output of
    layer k-1, the last entry after the final norm): EAGLE-1 (`feature_layers` None) the last hidden state [.., C];
    EAGLE-3 the listed layers and then the last hidden state, concatenated [.., (k+1)C] (the head reads the first
    kC, training scores it against the target's distribution computed from the last C)."""
    if feature_layers is None:
        return hidden_states[-1]
    return torch.cat([hidden_states[k] for k in feature_layers] + [hidden_states[-1]], dim=-1)


def _feature_meta(feature_layers: tuple[int, ...] | None) -> dict:
    """The cache-meta entry of the features (absent for EAGLE-1's, so caches built before EAGLE-3 still match)."""
    return {} if feature_layers is None else {"feature_layers": list(feature_layers)}


def answer_mask(seq: DraftSequence) -> torch.Tensor:
    """Bool [T]: which tokens of a sequence are answer (assistant) tokens, the ones the loss is on. A sequence is
    (tokens, features) (all answer), (tokens, features, prompt_len) or (tokens, features, mask)."""
    tokens = seq[0]
    third = seq[2] if len(seq) > 2 else 0
    if isinstance(third, torch.Tensor) and third.dtype == torch.bool:
        return third
    return torch.arange(len(tokens)) >= int(third)


def loss_weights(answer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which predictions of a sequence count, from its answer mask [T] (EAGLE's loss mask). The head's prediction at
    position i (i = 1 .. T-1, from the feature of i-1 and token i) is feature i, whose LM-head token is i+1: it
    counts when token i+1 is an answer token. Returns (regression weights [T-1], cross-entropy weights [T-2]); the
    last feature has no next token and counts when the answer runs to the end."""
    nxt = answer[2:]  # token i+1 for i = 1 .. T-2
    return torch.cat([nxt, answer[-1:]]).float(), nxt.float()


def ttt_mask(length: int, step: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean [(step+1)L, (step+1)L] attention mask over `step + 1` blocks of L positions (block b = the inputs of
    step b), True = attend. Row i of block b (position i+1) is what drafting computes at depth b for a prefix that
    ends at position i+1-b: it sees the teacher-forced keys of that prefix (block 0, positions <= i-b) and, of the
    nodes drafted after it, the one at each depth c <= b (block c, position i-b+c) -- its ancestors and itself.
    Block 0 is plain causal attention."""
    n = length * (step + 1)
    mask = torch.zeros(n, n, dtype=torch.bool, device=device)
    i = torch.arange(length, device=device)
    for b in range(step + 1):
        rows = b * length + i
        mask[rows[:, None], i[None, :]] = i[None, :] <= (i - b)[:, None] if b else i[None, :] <= i[:, None]
        for c in range(1, b + 1):
            col = i - b + c
            ok = col >= 0
            mask[rows[ok], c * length + col[ok]] = True
    return mask


def ttt_predictions(head: EagleDraftHead, f_in: torch.Tensor, emb: torch.Tensor, pos: torch.Tensor,
                    steps: int) -> list[torch.Tensor]:
    """The head's predicted features [L, C] at each step 0..steps: step 0 reads the target's features f_in
    [1, L, C] (teacher forcing), step b reads at position i+1 the feature it predicted at step b-1 for position i
    (its own, as when drafting at depth b), with the keys of earlier steps under `ttt_mask`. emb [1, L, C] are the
    embeddings of the tokens, pos [1, L] the positions."""
    length = f_in.shape[1]
    blocks, preds = [], []
    feats = f_in
    for b in range(steps + 1):
        blocks.append(head.fc(torch.cat([emb, feats], dim=-1)))  # [1, L, C]
        x = torch.cat(blocks, dim=1)  # [1, (b+1)L, C]
        mask = ttt_mask(length, b, x.device) if b else None
        out = head.layer(x, Positions(pos.repeat(1, b + 1)), None, None if mask is None else mask[None, None])
        preds.append(out[0, b * length:])  # block b: this step's predictions
        feats = torch.cat([f_in[:, :1], preds[-1][None, :-1]], dim=1)  # position i+1 reads the prediction for i
    return preds


def draft_loss(head: EagleDraftHead, embed, lm_head, tokens: torch.Tensor, feats: torch.Tensor,
               cfg: DraftTrainConfig, generator: torch.Generator | None = None, prompt_len: int = 0,
               answer: torch.Tensor | None = None, rows=None) -> tuple[torch.Tensor, dict]:
    """Loss of one sequence: tokens [T], feats [T, C]; only predictions of answer tokens count (`answer` [T] bool,
    else the tokens from `prompt_len` on), the rest is read as context. The token loss follows `cfg.cls_target`
    (module docstring), over the draft vocabulary when the head has one. Stats: `reg`, `cls`, `acc` (top-1 against
    the data's token; an answer token outside the draft vocabulary is a miss: it cannot be drafted) and, when the
    head is in eval mode, `acc_greedy` (against the target's greedy token, `target_greedy`); with `cfg.ttt_steps`
    each also per extra step (`acc_step1`, ...). `rows`: `head.draft_head_rows(lm_head)`, gathered once."""
    param = next(head.parameters())
    dtype, device = param.dtype, param.device
    tokens, feats = tokens.to(device), feats.to(device)
    answer = (torch.arange(len(tokens)) >= prompt_len if answer is None else answer).to(device)
    w_reg, w_cls = loss_weights(answer)
    f_in = feats[:-1].to(dtype)[None]  # features of positions 0..T-2
    if cfg.noise:
        scale = f_in.pow(2).mean().sqrt() * cfg.noise
        noise = torch.rand(f_in.shape, generator=generator, dtype=dtype).to(device)  # CPU generator: reproducible
        f_in = f_in + (noise * 2 - 1) * scale
    emb = embed(tokens[1:][None]).to(dtype)  # tokens 1..T-1
    pos = torch.arange(1, len(tokens), device=device)[None]
    target = feats[1:].to(dtype)
    labels = head.draft_ids(tokens[2:])  # the data's tokens 2..T-1 as draft indices, -100 outside the vocabulary
    distil = cfg.cls_target == "target"
    cls_labels = labels
    if cfg.cls_target != "data":
        with torch.no_grad():  # the target's next-token log-probabilities over the draft vocabulary, tokens 2..T-1
            target_logp = torch.log_softmax(head.draft_logits(lm_head, target[:-1], rows).float(), -1)  # [T-2, N]
        if not distil:  # "greedy": the target's top-1 among the draft ids is the label
            cls_labels = target_logp.argmax(-1)
    greedy = None if head.training else target_greedy(lm_head, target[:-1])  # [T-2] target ids
    preds = ttt_predictions(head, f_in, emb, pos, cfg.ttt_steps) if cfg.ttt_steps else [head(f_in, emb, pos)[0]]
    total, stats = 0.0, {}
    for b, pred in enumerate(preds):  # pred: predicted features of positions 1..T-1 at step b
        first = (torch.arange(len(pred), device=device) >= b).float()  # rows with a prefix at this depth
        wr, wc = w_reg * first, w_cls * first[:-1]
        reg = (F.smooth_l1_loss(pred, target, reduction="none").mean(-1) * wr).sum() / wr.sum().clamp(min=1)
        logits = head.draft_logits(lm_head, pred[:-1], rows).float()  # [T-2, N]: tokens 2..T-1
        if distil:
            kl = (target_logp.exp() * (target_logp - torch.log_softmax(logits, -1))).sum(-1)  # [T-2]
            cls = (kl * wc).sum() / wc.sum().clamp(min=1)
        else:
            ce = F.cross_entropy(logits, cls_labels.clamp(min=0), reduction="none") * (cls_labels >= 0)
            cls = (ce * wc).sum() / (wc * (cls_labels >= 0)).sum().clamp(min=1)
        top = logits.argmax(-1)  # [T-2] draft indices
        acc = (((top == labels) & (labels >= 0)).float() * wc).sum() / wc.sum().clamp(min=1)
        total = total + (1.0 if b == 0 else cfg.ttt_weight) * (reg + cfg.cls_weight * cls)
        st = {"reg": reg.item(), "cls": cls.item(), "acc": acc.item()}
        if greedy is not None:
            drafted = top if head.draft_vocab is None else head.draft_vocab[top]
            st["acc_greedy"] = (((drafted == greedy).float() * wc).sum() / wc.sum().clamp(min=1)).item()
        stats.update(st if b == 0 else {f"{k}_step{b}": v for k, v in st.items()})
    return total, stats


def target_greedy(lm_head, feats: torch.Tensor) -> torch.Tensor:
    """The target's greedy next token [n] (over its whole vocabulary) from its features [n, C]: what verification
    accepts. Evaluation scores the head's top-1 against it (`acc_greedy`); on the target's own greedy answers it is
    the data's next token, on other text (ShareGPT) it is not. Chunked: the full LM head over thousands of rows at
    once would need a [n, V] buffer."""
    w = lm_head.weight
    bias = getattr(lm_head, "bias", None)
    return torch.cat([F.linear(c.to(w.dtype), w, bias).argmax(-1) for c in feats.split(1024)]) if len(feats) \
        else torch.zeros(0, dtype=torch.long, device=feats.device)


def target_rows(head, lm_head) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The target's LM-head weight [N, C] (and bias) over the head's draft vocabulary (all V ids without one): what
    EAGLE-1 heads score with, and what EAGLE-3 training computes the target's distribution with."""
    return lm_head_rows(lm_head, head.draft_vocab)


def eagle3_mask(length: int, step: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean [L, (step+1)L] attention mask of EAGLE-3's training-time test at `step` (as speculators builds it):
    row i attends to the teacher-forced block causally (columns <= i) and, in each later block, to its own column i
    (the earlier nodes of its own draft chain)."""
    i = torch.arange(length, device=device)
    blocks = [i[None, :] <= i[:, None]] + [i[None, :] == i[:, None]] * step
    return torch.cat(blocks, dim=1)


def eagle3_ttt_logits(head, embed, tokens: torch.Tensor, layer_feats: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """The head's draft logits [n, N] at each training-time-test step 0..steps (n = T-1 rows; row i of step s
    predicts token i+2+s, see `eagle3_loss`). tokens [T]; layer_feats [T, kC]: the target's layer features."""
    dtype, device = next(head.parameters()).dtype, tokens.device
    n = len(tokens) - 1
    hidden = head.from_target(layer_feats[:-1].to(dtype))[None]  # [1, n, C]
    cache = LeanCache(1)
    rows = torch.arange(n, device=device)
    out_logits = []
    for step in range(steps + 1):
        ids = torch.cat([tokens[1 + step:], tokens.new_zeros(step)])  # row i: token i+1+step (0 past the end)
        mask = eagle3_mask(n, step, device)[None, None]  # [1, 1, n, (step+1)n]
        hidden = head(hidden, embed(ids[None]).to(dtype), (rows + 1 + step)[None], cache, mask)  # [1, n, C]
        out_logits.append(head.draft_logits(None, hidden[0]))  # the next step reads this step's output
    return out_logits


def eagle3_loss(head, embed, lm_head, tokens: torch.Tensor, feats: torch.Tensor, cfg: DraftTrainConfig,
                generator: torch.Generator | None = None, prompt_len: int = 0,
                answer: torch.Tensor | None = None, rows=None) -> tuple[torch.Tensor, dict]:
    """EAGLE-3's loss of one sequence, as speculators trains it: `1 + cfg.ttt_steps` steps; step 0 reads the
    head's fusion of the target's layer features (`head.from_target`), step s reads at row i the head's own output of
    step s-1 with the true token s positions on, so row i of step s is the depth-(s+1) draft after the prefix that
    ends at position i+1 (`eagle3_mask`). Each step's loss is the forward KL from the target's next-token
    distribution over the draft vocabulary (from the last hidden state stored after the layer features) to the
    head's, on rows whose predicted token is an answer token; extra steps weigh `cfg.ttt_weight`. No feature
    regression and no feature noise (EAGLE-3 drops both). tokens [T]; feats [T, (k+1)C] (`pick_features`).
    `rows`: `target_rows(head, lm_head)`, gathered once by the caller."""
    param = next(head.parameters())
    device = param.device
    tokens, feats = tokens.to(device), feats.to(device)
    answer = (torch.arange(len(tokens)) >= prompt_len if answer is None else answer).to(device)
    width = head.config.hidden_size * len(head.feature_layers)
    n = len(tokens) - 1  # rows i = 0 .. T-2: pair (layer features of token i, token i+1) at position i+1
    w, bias = rows if rows is not None else target_rows(head, lm_head)
    with torch.no_grad():
        target_logp = torch.log_softmax(F.linear(feats[1:, width:].to(w.dtype), w, bias).float(), -1)  # [n, N]
    labels = head.draft_ids(tokens)  # [T] draft index or -100
    rows_i = torch.arange(n, device=device)
    total, stats = 0.0, {}
    for step, logits in enumerate(eagle3_ttt_logits(head, embed, tokens, feats[:, :width], cfg.ttt_steps)):
        logp = torch.log_softmax(logits.float(), -1)  # [n, N]: row i predicts token i+2+step
        valid = rows_i < n - step  # the target's distribution exists for rows whose prediction is in the sequence
        tgt_row = (rows_i + step).clamp(max=n - 1)
        tok = (rows_i + 2 + step).clamp(max=len(tokens) - 1)
        wt = (valid & answer[tok]).float()
        kl = (target_logp[tgt_row].exp() * (target_logp[tgt_row] - logp)).sum(-1)  # [n] KL(target || draft)
        loss = (kl * wt).sum() / wt.sum().clamp(min=1)
        acc = ((logp.argmax(-1) == labels[tok]) & (labels[tok] >= 0)).float()
        acc = (acc * wt).sum() / wt.sum().clamp(min=1)
        top = ((logp.argmax(-1) == target_logp[tgt_row].argmax(-1)).float() * wt).sum() / wt.sum().clamp(min=1)
        total = total + (1.0 if step == 0 else cfg.ttt_weight) * loss
        st = {"kl": loss.item(), "acc": acc.item(), "acc_target": top.item()}
        stats.update(st if step == 0 else {f"{k}_step{step}": v for k, v in st.items()})
    return total, stats


def sequence_loss(head, *args, **kwargs) -> tuple[torch.Tensor, dict]:
    """The loss of one sequence for this kind of head: EAGLE-1's `draft_loss` or EAGLE-3's `eagle3_loss`."""
    return (eagle3_loss if head.arch == "eagle3" else draft_loss)(head, *args, **kwargs)


def _context_cut(tokens: torch.Tensor, feats: torch.Tensor, answer: torch.Tensor,
                 max_context: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep at most `max_context` tokens before the first answer token (the loss is on answer positions only, so a
    long prompt mostly costs compute; the head still reads the last `max_context` prompt tokens as context)."""
    first = int(answer.nonzero()[0]) if bool(answer.any()) else len(tokens)
    if max_context is None or first <= max_context:
        return tokens, feats, answer
    cut = first - max_context
    return tokens[cut:], feats[cut:], answer[cut:]


def _predicted(answer: torch.Tensor) -> int:
    """Number of answer tokens a sequence's head predictions are scored on (the cross-entropy positions)."""
    return int(answer[2:].sum())


@torch.no_grad()
def evaluate_head(head: EagleDraftHead, embed, lm_head, data: list, cfg: DraftTrainConfig) -> dict:
    """Teacher-forced next-token accuracy and losses of `head` on draft sequences (see `answer_mask`), without
    feature noise, weighted by predicted answer tokens; with `cfg.ttt_steps` also those of the head fed its own
    features (`acc_step1`, ...: the accuracy at drafting depth 2, ...)."""
    was_training = head.training
    head.eval()
    clean = dataclasses.replace(cfg, noise=0.0)
    rows = target_rows(head, lm_head)
    totals: dict[str, float] = {}
    n = 0
    for d in data:
        tokens, feats, answer = _context_cut(d[0], d[1], answer_mask(d), cfg.max_context)
        m = _predicted(answer)
        if m <= 0:
            continue
        _, st = sequence_loss(head, embed, lm_head, tokens, feats, clean, None, answer=answer, rows=rows)
        for k, v in st.items():  # with ttt_steps also the accuracy at each drafting depth (acc_step1, ...)
            totals[k] = totals.get(k, 0.0) + v * m
        n += m
    head.train(was_training)
    return {k: v / max(n, 1) for k, v in totals.items()} | {"tokens": n}


def train_head(head: EagleDraftHead, embed, lm_head, data: list[tuple[torch.Tensor, torch.Tensor]],
               cfg: DraftTrainConfig, progress: bool = True, val_data: list | None = None) -> list[dict]:
    """Train `head` in place on (tokens, features) sequences; returns per-step logs (with `val` = held-out
    teacher-forced accuracy/losses after each epoch when `val_data` is given). The embedding and LM head are
    frozen (they are the target's)."""
    head.train()
    for p in list(embed.parameters()) + list(lm_head.parameters()):
        p.requires_grad_(False)
    if head.arch == "eagle3":
        head.lm_head.weight.requires_grad_(False)  # the target's rows, frozen (as speculators trains EAGLE-3)
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    rows = target_rows(head, lm_head)  # frozen: gathered once for the whole run
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = [_context_cut(d[0], d[1], answer_mask(d), cfg.max_context) for d in data]
    data = [(t[: cfg.max_len], f[: cfg.max_len], a[: cfg.max_len]) for t, f, a in data]
    data = [d for d in data if len(d[0]) >= 3 and _predicted(d[2]) > 0]
    counted = [_predicted(d[2]) for d in data]  # predictions with a loss (of answer tokens)
    steps_per_epoch = max(1, math.ceil(sum(counted) / cfg.batch_tokens))  # batches hold >= batch_tokens
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, max(1, total // 20), total, 0.0))
    logs = []
    bar = tqdm(total=total, desc="draft head", disable=not progress, leave=False)
    for epoch in range(cfg.epochs):
        order = list(range(len(data)))
        rng.shuffle(order)
        batch, used = [], 0
        for i in order + [None]:
            if i is not None:
                batch.append((*data[i], counted[i]))
                used += counted[i]
                if used < cfg.batch_tokens:
                    continue
            if not batch:
                break
            opt.zero_grad(set_to_none=True)
            n = sum(d[3] for d in batch)
            stats: dict[str, float] = {}
            for tokens, feats, answer, m in batch:
                with torch.autocast(next(head.parameters()).device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    loss, st = sequence_loss(head, embed, lm_head, tokens, feats, cfg, gen, answer=answer, rows=rows)
                (loss * m / n).backward()
                for k, v in st.items():
                    stats[k] = stats.get(k, 0.0) + v * m / n
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            logs.append({"epoch": epoch, **stats})
            bar.update(1)
            bar.set_postfix({k: f"{stats[k]:.3f}" for k in ("acc", "reg", "kl") if k in stats})
            batch, used = [], 0
        if val_data:
            logs[-1]["val"] = evaluate_head(head, embed, lm_head, val_data, cfg)
            val = logs[-1]["val"]
            greedy = f", agreement with the target's greedy token {val['acc_greedy']:.3f}" if "acc_greedy" in val else ""
            bar.write(f"epoch {epoch}: held-out next-token accuracy {val['acc']:.3f}{greedy}")
    bar.close()
    head.eval()
    return logs


@torch.no_grad()
def answer_with_features(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64,
                         max_prompt_tokens: int = 384, progress: bool = True,
                         feature_layers: tuple[int, ...] | None = None
                         ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, int]]:
    """Answer each prompt greedily with the target and keep the target's features on the way.

    Yields (prompt index, tokens [T] long, features [T, C] fp16, prompt length) per prompt, in batches of prompts of
    similar length (left padded, explicit positions). The features are the ones the generation computes anyway: the
    last hidden state of every token fed to the target, so no second teacher-forced pass is needed (a greedy
    answer's features equal its teacher-forced ones). A sequence ends with the first EOS (included) or after
    `max_new_tokens` answer tokens. Prompts are cut to their last `max_prompt_tokens` tokens. `feature_layers`:
    EAGLE-3's features instead of the last hidden state (`pick_features`).
    """
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    eos = tokenizer.eos_token_id
    encoded = [encode_chat(tokenizer, p)[-max_prompt_tokens:] for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    bar = tqdm(total=len(order), desc="target answers + features", disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(idx):
            ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[r, width - len(encoded[i]):] = 1
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                    output_hidden_states=True, logits_to_keep=1)
        prompt_feats = pick_features(out.hidden_states, feature_layers).to(torch.float16).cpu()  # [B, width, C]
        cache, fed, feats = out.past_key_values, [], []
        done = torch.zeros(len(idx), dtype=torch.bool, device=device)
        nxt = out.logits[:, -1].argmax(-1)  # [B]
        for _ in range(max_new_tokens):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = pos[:, -1:] + 1
            out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, past_key_values=cache,
                        use_cache=True, output_hidden_states=True, logits_to_keep=1)
            cache = out.past_key_values
            fed.append(nxt.cpu())
            feats.append(pick_features(out.hidden_states, feature_layers)[:, -1].to(torch.float16).cpu())
            if eos is not None:
                done |= nxt == eos
            if bool(done.all()):
                break
            nxt = out.logits[:, -1].argmax(-1)
        fed_t, feat_t = torch.stack(fed, 1), torch.stack(feats, 1)  # [B, S], [B, S, C]
        for r, i in enumerate(idx):
            answer = fed_t[r].tolist()
            n = answer.index(eos) + 1 if eos in answer else len(answer)
            p = len(encoded[i])
            tokens = torch.tensor(encoded[i] + answer[:n])
            yield i, tokens, torch.cat([prompt_feats[r, width - p:], feat_t[r, :n]]), p
        bar.update(len(idx))
    bar.close()


def _pin_meta(folder: Path, meta: dict, built: str) -> None:
    """Write a feature cache's `meta.json`, or refuse a folder whose `meta.json` says it was built otherwise."""
    path = folder / "meta.json"
    if not path.exists():
        atomic_write_text(path, json.dumps(meta, indent=1))
        return
    old = json.loads(path.read_text())
    keys = set(meta) | {"feature_layers"}  # an EAGLE-1 request must not read an EAGLE-3 cache either
    if {k: old.get(k) for k in keys} != {k: meta.get(k) for k in keys}:
        raise LeanLMError(f"feature cache {folder} was built {built} ({old}). Fix: pass another --data folder or "
                          "delete this one")


def build_feature_cache(model, tokenizer, prompts: list[str], folder: str | Path, max_new_tokens: int,
                        batch_size: int = 64, shard_prompts: int = 256, progress: bool = True,
                        feature_layers: tuple[int, ...] | None = None) -> Path:
    """Answer `prompts` with features (`answer_with_features`) into `folder`, one safetensors shard per
    `shard_prompts` prompts, each written atomically, so an interrupted run resumes where it stopped and the data is
    built once for several trainings. `meta.json` pins the settings; a folder built with other settings is refused.
    """

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"max_new_tokens": max_new_tokens, "num_prompts": len(prompts), "shard_prompts": shard_prompts,
            "prompts_sha1": hashlib.sha1("\x00".join(prompts).encode()).hexdigest(),
            "hidden_size": model.config.hidden_size, "dtype": str(next(model.parameters()).dtype)
            } | _feature_meta(feature_layers)
    _pin_meta(folder, meta, "with other settings")
    shards = range(0, len(prompts), shard_prompts)
    todo = [s for s in shards if not (folder / f"shard-{s // shard_prompts:05d}.safetensors").exists()]
    for s in tqdm(todo, desc="feature shards", disable=not progress):
        chunk = prompts[s:s + shard_prompts]
        tensors = {}
        for i, tokens, feats, p in answer_with_features(model, tokenizer, chunk, max_new_tokens, batch_size,
                                                        progress=progress, feature_layers=feature_layers):
            tensors[f"{i:05d}.tokens"], tensors[f"{i:05d}.features"] = tokens, feats.contiguous()
            tensors[f"{i:05d}.prompt_len"] = torch.tensor([p])
        atomic_write_file(folder / f"shard-{s // shard_prompts:05d}.safetensors",
                          lambda tmp: save_file(tensors, str(tmp)))
    return folder


@torch.no_grad()
def last_hidden(model, ids: torch.Tensor, mask: torch.Tensor,
                feature_layers: tuple[int, ...] | None = None) -> torch.Tensor:
    """The target's features [B, T, C]: its last hidden state (after the final norm, what its LM head reads), from
    the decoder alone when the model exposes it (the LM head over every position would be wasted work); with
    `feature_layers` EAGLE-3's [B, T, (k+1)C] (`pick_features`)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is not None and decoder is not model:
        out = decoder(input_ids=ids, attention_mask=mask, use_cache=False,
                      output_hidden_states=feature_layers is not None)
        return out.last_hidden_state if feature_layers is None else pick_features(out.hidden_states, feature_layers)
    return pick_features(model(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                               use_cache=False).hidden_states, feature_layers)


def _shard_digest(chunk: list[tuple[list[int], list[bool]]]) -> str:
    digest = hashlib.sha1()
    for ids, mask in chunk:
        digest.update(json.dumps([ids, mask]).encode())
    return digest.hexdigest()


def build_conversation_cache(model, sequences: list[tuple[list[int], list[bool]]], folder: str | Path,
                             source: str, shard_size: int = 64, batch_tokens: int = 4096,
                             progress: bool = True, feature_layers: tuple[int, ...] | None = None) -> Path:
    """Teacher-forced target features of conversations (token ids + assistant mask each, e.g. ShareGPT through
    `sharegpt.encode_conversation`) into `folder`: one forward per conversation, no generation, so it runs at
    prompt-processing speed.

    One safetensors shard per `shard_size` consecutive sequences, each written atomically and carrying the digest of
    its sequences, so an interrupted run resumes at its first missing shard and a longer list of the same source
    (more conversations) only adds shards; `meta.json` pins the source and settings, and a folder whose shards hold
    other sequences is refused. `log.jsonl` has the tokens and seconds of every shard built (the extraction
    tokens/s). Batches hold conversations of similar length, right-padded, up to `batch_tokens` tokens.
    `feature_layers`: EAGLE-3's features (`pick_features`), pinned in `meta.json`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"source": source, "shard_size": shard_size, "hidden_size": model.config.hidden_size,
            "dtype": str(next(model.parameters()).dtype)} | _feature_meta(feature_layers)
    _pin_meta(folder, meta, "from other sequences or settings")
    device = next(model.parameters()).device
    starts = range(0, len(sequences), shard_size)
    path_of = lambda s: folder / f"shard-{s // shard_size:05d}.safetensors"  # noqa: E731
    todo = []
    for s in starts:
        chunk = sequences[s:s + shard_size]
        if not path_of(s).exists():
            todo.append(s)
            continue
        with safe_open(str(path_of(s)), "pt") as f:
            stored = f.metadata() or {}
        count = int(stored.get("count", 0))
        if stored.get("sha1") != _shard_digest(chunk[:count]):
            raise LeanLMError(f"feature cache {folder}: {path_of(s).name} holds other sequences than these. Fix: "
                              "pass another --data folder or delete this one")
        if count < len(chunk):
            todo.append(s)  # the last shard of a shorter list: rebuilt with the sequences added since
    total = sum(len(ids) for ids, _ in sequences)
    done = total - sum(len(ids) for s in todo for ids, _ in sequences[s:s + shard_size])
    bar = tqdm(total=total, initial=done, desc="target features", unit="tok", unit_scale=True, disable=not progress)
    for s in todo:
        t0 = time.perf_counter()
        chunk = sequences[s:s + shard_size]
        order = sorted(range(len(chunk)), key=lambda i: len(chunk[i][0]))
        tensors: dict[str, torch.Tensor] = {}
        i = 0
        while i < len(order):
            group = [order[i]]
            while i + len(group) < len(order) and \
                    len(chunk[order[i + len(group)]][0]) * (len(group) + 1) <= batch_tokens:
                group.append(order[i + len(group)])
            i += len(group)
            width = max(len(chunk[j][0]) for j in group)
            ids = torch.zeros(len(group), width, dtype=torch.long)
            mask = torch.zeros(len(group), width, dtype=torch.long)
            for r, j in enumerate(group):
                ids[r, : len(chunk[j][0])] = torch.tensor(chunk[j][0])
                mask[r, : len(chunk[j][0])] = 1
            hidden = last_hidden(model, ids.to(device), mask.to(device), feature_layers)  # [b, width, C or (k+1)C]
            for r, j in enumerate(group):
                n = len(chunk[j][0])
                key = f"{s + j:06d}"
                tensors[f"{key}.tokens"] = ids[r, :n].clone()
                tensors[f"{key}.features"] = hidden[r, :n].to(torch.float16).cpu().contiguous()
                tensors[f"{key}.answer_mask"] = torch.tensor(chunk[j][1], dtype=torch.bool)
            bar.update(int(mask.sum()))
        digest = {"sha1": _shard_digest(chunk), "count": str(len(chunk))}
        atomic_write_file(path_of(s), lambda tmp: save_file(tensors, str(tmp), metadata=digest))
        with open(folder / "log.jsonl", "a") as f:
            f.write(json.dumps({"shard": s // shard_size, "tokens": sum(len(ids) for ids, _ in chunk),
                                "answer_tokens": sum(sum(m) for _, m in chunk),
                                "seconds": time.perf_counter() - t0}) + "\n")
    bar.close()
    return folder


def extraction_rate(folder: str | Path) -> dict:
    """Tokens, answer tokens, seconds and tokens/s of the feature extraction logged in a cache's `log.jsonl`."""
    path = Path(folder) / "log.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    tokens, seconds = sum(r["tokens"] for r in rows), sum(r["seconds"] for r in rows)
    return {"shards": len(rows), "tokens": tokens, "answer_tokens": sum(r["answer_tokens"] for r in rows),
            "seconds": seconds, "tokens_per_s": tokens / seconds if seconds else 0.0}


def load_feature_cache(folder: str | Path, limit: int | None = None) -> list[DraftSequence]:
    """(tokens, features, answer mask or prompt length) per sequence from a `build_feature_cache` or
    `build_conversation_cache` folder, in order (the first `limit` shards' worth when given)."""
    data = []
    for path in sorted(Path(folder).glob("shard-*.safetensors"))[:limit]:
        t = load_file(str(path))
        for key in sorted(k for k in t if k.endswith(".tokens")):
            stem = key[: -len(".tokens")]
            third = t[stem + ".answer_mask"] if stem + ".answer_mask" in t else int(t[stem + ".prompt_len"][0])
            data.append((t[key], t[stem + ".features"], third))
    return data


def answer_token_counts(data: list, vocab_size: int) -> torch.Tensor:
    """How often each target id occurs as an answer token in draft sequences [V] (long)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for d in data:
        counts += torch.bincount(d[0][answer_mask(d)].long(), minlength=vocab_size)[:vocab_size]
    return counts


def select_draft_vocab(counts: torch.Tensor, size: int) -> torch.Tensor:
    """The `size` most frequent answer ids (FR-Spec's reduced draft vocabulary; ties go to the lower id), sorted by
    id: [N] long. `coverage(counts, vocab)` says which share of answer tokens it holds."""
    if not 0 < size <= len(counts):
        raise LeanLMError(f"draft vocabulary size {size} must be in [1, {len(counts)}]. Fix: e.g. 8192")
    order = torch.sort(-counts, stable=True).indices  # most frequent first, lower id first on ties
    return order[:size].sort().values


def coverage(counts: torch.Tensor, vocab: torch.Tensor | None) -> float:
    """Share of the counted answer tokens whose id is in `vocab` (1.0 for the full vocabulary)."""
    total = int(counts.sum())
    return 1.0 if vocab is None or total == 0 else float(counts[vocab].sum()) / total
