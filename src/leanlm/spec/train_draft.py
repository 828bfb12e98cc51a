"""Training an EAGLE draft head: teacher-forced target features over token sequences, then a small training loop.

Data (`build_sequences`): prompts in the target's chat format, answered by the target itself (greedy), so the head
learns the distribution it will be asked to predict. `collect_features` runs the target once over each sequence and
keeps its last-layer features (fp16) with the tokens.

Loss (EAGLE-1): for pair j = (feature j, token j+1) the head predicts feature j+1; regression loss smooth-L1 against
the target's feature, plus `cls_weight` (0.1) times the cross-entropy of the LM head's prediction for token j+2.
Uniform noise U(-a, a) on the input features, with a = `noise` (0.1, EAGLE's value) times the features' RMS, makes
the head robust to its own errors at draft time.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from leanlm.spec.draft import EagleDraftHead
from leanlm.spec.prompts import encode_chat


@dataclass
class DraftTrainConfig:
    epochs: int = 2
    lr: float = 1e-3
    batch_tokens: int = 4096
    cls_weight: float = 0.1
    noise: float = 0.1
    seed: int = 0
    max_len: int = 512


@torch.no_grad()
def collect_features(model, sequences: list[list[int]], batch_size: int = 4,
                     progress: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens [T] long, features [T, C] fp16) per sequence: the target's last hidden state at every position."""
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
        hidden = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True,
                       use_cache=False).hidden_states[-1]
        for r, i in enumerate(idx):
            n = len(sequences[i])
            result[i] = (ids[r, :n].clone(), hidden[r, :n].to(torch.float16).cpu())
    out = [result[i] for i in range(len(sequences))]
    return out


def draft_loss(head: EagleDraftHead, embed, lm_head, tokens: torch.Tensor, feats: torch.Tensor,
               cfg: DraftTrainConfig, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """Loss of one sequence: tokens [T], feats [T, C]."""
    dtype = next(head.parameters()).dtype
    f_in = feats[:-1].to(dtype)[None]  # features of positions 0..T-2
    if cfg.noise:
        scale = f_in.pow(2).mean().sqrt() * cfg.noise
        f_in = f_in + (torch.rand(f_in.shape, generator=generator, dtype=dtype) * 2 - 1) * scale
    emb = embed(tokens[1:][None]).to(dtype)  # tokens 1..T-1
    pos = torch.arange(1, len(tokens))[None]
    pred = head(f_in, emb, pos)[0]  # predicted features of positions 1..T-1
    target = feats[1:].to(dtype)
    reg = F.smooth_l1_loss(pred, target)
    logits = lm_head(pred[:-1].to(lm_head.weight.dtype)).float()  # predict tokens 2..T-1
    cls = F.cross_entropy(logits, tokens[2:])
    acc = (logits.argmax(-1) == tokens[2:]).float().mean()
    return reg + cfg.cls_weight * cls, {"reg": reg.item(), "cls": cls.item(), "acc": acc.item()}


def train_head(head: EagleDraftHead, embed, lm_head, data: list[tuple[torch.Tensor, torch.Tensor]],
               cfg: DraftTrainConfig, progress: bool = True) -> list[dict]:
    """Train `head` in place on (tokens, features) sequences; returns per-step logs. The embedding and LM head are
    frozen (they are the target's)."""
    head.train()
    for p in list(embed.parameters()) + list(lm_head.parameters()):
        p.requires_grad_(False)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = [(t[: cfg.max_len], f[: cfg.max_len]) for t, f in data if len(t) >= 3]
    steps_per_epoch = max(1, math.ceil(sum(len(t) for t, _ in data) / cfg.batch_tokens))  # batches hold >= batch_tokens
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, total // 20)) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    logs = []
    bar = tqdm(total=total, desc="draft head", disable=not progress, leave=False)
    for epoch in range(cfg.epochs):
        order = list(range(len(data)))
        rng.shuffle(order)
        batch, used = [], 0
        for i in order + [None]:
            if i is not None:
                batch.append(data[i])
                used += len(data[i][0])
                if used < cfg.batch_tokens:
                    continue
            if not batch:
                break
            opt.zero_grad(set_to_none=True)
            n = sum(len(t) for t, _ in batch)
            stats = {"reg": 0.0, "cls": 0.0, "acc": 0.0}
            for tokens, feats in batch:
                loss, st = draft_loss(head, embed, lm_head, tokens, feats, cfg, gen)
                (loss * len(tokens) / n).backward()
                for k in stats:
                    stats[k] += st[k] * len(tokens) / n
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            opt.step()
            sched.step()
            logs.append({"epoch": epoch, **stats})
            bar.update(1)
            bar.set_postfix(acc=f"{stats['acc']:.3f}", reg=f"{stats['reg']:.3f}")
            batch, used = [], 0
    bar.close()
    head.eval()
    return logs


@torch.no_grad()
def build_sequences(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 8,
                    progress: bool = True) -> list[list[int]]:
    """prompt + the target's greedy answer, as token ids; chat-formatted when the tokenizer has a chat template."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    encoded = [encode_chat(tokenizer, p) for p in prompts]
    seqs = []
    for start in tqdm(range(0, len(encoded), batch_size), desc="target answers", disable=not progress, leave=False):
        chunk = encoded[start:start + batch_size]
        width = max(len(e) for e in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, e in enumerate(chunk):  # left padding for generation
            ids[r, width - len(e):] = torch.tensor(e)
            mask[r, width - len(e):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad)
        for r, e in enumerate(chunk):
            new = out[r, width:].tolist()
            if tokenizer.eos_token_id in new:
                new = new[: new.index(tokenizer.eos_token_id) + 1]
            seqs.append(e + new)
    return seqs
