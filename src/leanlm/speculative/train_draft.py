"""Training an EAGLE draft head: teacher-forced target features over token sequences, then a small training loop.

Data (`answer_with_features`, cached by `build_feature_cache`): prompts in the target's chat format, answered by the target itself (greedy), so the head
learns the distribution it will be asked to predict. `collect_features` runs the target once over each sequence and
keeps its last-layer features (fp16) with the tokens.

Loss (EAGLE-1): for pair j = (feature j, token j+1) the head predicts feature j+1; regression loss smooth-L1 against
the target's feature, plus `cls_weight` (0.1) times the cross-entropy of the LM head's prediction for token j+2.
Uniform noise U(-a, a) on the input features, with a = `noise` (0.1, EAGLE's value) times the features' RMS, makes
the head robust to its own errors at draft time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from leanlm.checkpoint import atomic_write_file, atomic_write_text
from leanlm.errors import LeanLMError
from leanlm.schedule import lr_lambda
from leanlm.speculative.draft import EagleDraftHead
from leanlm.speculative.prompts import encode_chat


@dataclass
class DraftTrainConfig:
    epochs: int = 2
    lr: float = 1e-3
    batch_tokens: int = 4096
    cls_weight: float = 0.1
    noise: float = 0.1
    seed: int = 0
    max_len: int = 512
    bf16: bool = False  # autocast to bfloat16 (on CPU it recasts the frozen LM head every call: slower there)
    max_context: int | None = None  # prompt tokens kept before each answer (None = all)


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
               cfg: DraftTrainConfig, generator: torch.Generator | None = None,
               prompt_len: int = 0) -> tuple[torch.Tensor, dict]:
    """Loss of one sequence: tokens [T], feats [T, C]. With `prompt_len` p > 0 (EAGLE's loss mask) only the
    predictions that draft answer tokens count: predicted features of positions >= p-1 (whose LM-head output is a
    token at position >= p); the prompt is still read as context."""
    param = next(head.parameters())
    dtype, device = param.dtype, param.device
    tokens, feats = tokens.to(device), feats.to(device)
    f_in = feats[:-1].to(dtype)[None]  # features of positions 0..T-2
    if cfg.noise:
        scale = f_in.pow(2).mean().sqrt() * cfg.noise
        noise = torch.rand(f_in.shape, generator=generator, dtype=dtype).to(device)  # CPU generator: reproducible
        f_in = f_in + (noise * 2 - 1) * scale
    emb = embed(tokens[1:][None]).to(dtype)  # tokens 1..T-1
    pos = torch.arange(1, len(tokens), device=device)[None]
    pred = head(f_in, emb, pos)[0]  # predicted features of positions 1..T-1
    first = max(0, prompt_len - 2)  # index into pred of position max(1, p-1)
    target = feats[1 + first:].to(dtype)
    reg = F.smooth_l1_loss(pred[first:], target)
    logits = lm_head(pred[first:-1].to(lm_head.weight.dtype)).float()  # predict tokens first+2..T-1
    labels = tokens[first + 2:]
    cls = F.cross_entropy(logits, labels)
    acc = (logits.argmax(-1) == labels).float().mean()
    return reg + cfg.cls_weight * cls, {"reg": reg.item(), "cls": cls.item(), "acc": acc.item()}


def _context_cut(tokens: torch.Tensor, feats: torch.Tensor, prompt_len: int,
                 max_context: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Keep at most `max_context` prompt tokens before the answer (the loss is on answer positions only, so a long
    prompt mostly costs compute; the head still reads the last `max_context` prompt tokens as context)."""
    if max_context is None or prompt_len <= max_context:
        return tokens, feats, prompt_len
    cut = prompt_len - max_context
    return tokens[cut:], feats[cut:], max_context


@torch.no_grad()
def evaluate_head(head: EagleDraftHead, embed, lm_head, data: list, cfg: DraftTrainConfig) -> dict:
    """Teacher-forced next-token accuracy and losses of `head` on (tokens, features[, prompt_len]) sequences,
    without feature noise, weighted by answer tokens."""
    was_training = head.training
    head.eval()
    clean = dataclasses.replace(cfg, noise=0.0)
    totals, n = {"reg": 0.0, "cls": 0.0, "acc": 0.0}, 0
    for d in data:
        tokens, feats, prompt_len = _context_cut(d[0], d[1], d[2] if len(d) > 2 else 0, cfg.max_context)
        m = len(tokens) - 2 - max(0, prompt_len - 2)  # predicted tokens
        if m <= 0:
            continue
        _, st = draft_loss(head, embed, lm_head, tokens, feats, clean, None, prompt_len)
        for k in totals:
            totals[k] += st[k] * m
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
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = [_context_cut(d[0], d[1], d[2] if len(d) > 2 else 0, cfg.max_context) for d in data]
    data = [(t[: cfg.max_len], f[: cfg.max_len], p) for t, f, p in data]
    data = [d for d in data if len(d[0]) >= max(3, d[2] + 1)]
    counted = [len(d[0]) - 1 - max(0, d[2] - 2) for d in data]  # positions with a loss (answer positions)
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
            stats = {"reg": 0.0, "cls": 0.0, "acc": 0.0}
            for tokens, feats, prompt_len, m in batch:
                with torch.autocast(next(head.parameters()).device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    loss, st = draft_loss(head, embed, lm_head, tokens, feats, cfg, gen, prompt_len)
                (loss * m / n).backward()
                for k in stats:
                    stats[k] += st[k] * m / n
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            opt.step()
            sched.step()
            logs.append({"epoch": epoch, **stats})
            bar.update(1)
            bar.set_postfix(acc=f"{stats['acc']:.3f}", reg=f"{stats['reg']:.3f}")
            batch, used = [], 0
        if val_data:
            logs[-1]["val"] = evaluate_head(head, embed, lm_head, val_data, cfg)
            bar.write(f"epoch {epoch}: held-out next-token accuracy {logs[-1]['val']['acc']:.3f}")
    bar.close()
    head.eval()
    return logs


@torch.no_grad()
def answer_with_features(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64,
                         max_prompt_tokens: int = 384, progress: bool = True
                         ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, int]]:
    """Answer each prompt greedily with the target and keep the target's features on the way.

    Yields (prompt index, tokens [T] long, features [T, C] fp16, prompt length) per prompt, in batches of prompts of
    similar length (left padded, explicit positions). The features are the ones the generation computes anyway: the
    last hidden state of every token fed to the target, so no second teacher-forced pass is needed (a greedy
    answer's features equal its teacher-forced ones). A sequence ends with the first EOS (included) or after
    `max_new_tokens` answer tokens. Prompts are cut to their last `max_prompt_tokens` tokens.
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
        prompt_feats = out.hidden_states[-1].to(torch.float16).cpu()  # [B, width, C]
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
            feats.append(out.hidden_states[-1][:, -1].to(torch.float16).cpu())
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


def build_feature_cache(model, tokenizer, prompts: list[str], folder: str | Path, max_new_tokens: int,
                        batch_size: int = 64, shard_prompts: int = 256, progress: bool = True) -> Path:
    """Answer `prompts` with features (`answer_with_features`) into `folder`, one safetensors shard per
    `shard_prompts` prompts, each written atomically, so an interrupted run resumes where it stopped and the data is
    built once for several trainings. `meta.json` pins the settings; a folder built with other settings is refused.
    """

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"max_new_tokens": max_new_tokens, "num_prompts": len(prompts), "shard_prompts": shard_prompts,
            "prompts_sha1": hashlib.sha1("\x00".join(prompts).encode()).hexdigest(),
            "hidden_size": model.config.hidden_size, "dtype": str(next(model.parameters()).dtype)}
    meta_path = folder / "meta.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if {k: old.get(k) for k in meta} != meta:
            raise LeanLMError(f"feature cache {folder} was built with other settings ({old}). Fix: pass another "
                              "--data folder or delete this one")
    else:
        atomic_write_text(meta_path, json.dumps(meta, indent=1))
    shards = range(0, len(prompts), shard_prompts)
    todo = [s for s in shards if not (folder / f"shard-{s // shard_prompts:05d}.safetensors").exists()]
    for s in tqdm(todo, desc="feature shards", disable=not progress):
        chunk = prompts[s:s + shard_prompts]
        tensors = {}
        for i, tokens, feats, p in answer_with_features(model, tokenizer, chunk, max_new_tokens, batch_size,
                                                        progress=progress):
            tensors[f"{i:05d}.tokens"], tensors[f"{i:05d}.features"] = tokens, feats.contiguous()
            tensors[f"{i:05d}.prompt_len"] = torch.tensor([p])
        atomic_write_file(folder / f"shard-{s // shard_prompts:05d}.safetensors",
                          lambda tmp: save_file(tensors, str(tmp)))
    return folder


def load_feature_cache(folder: str | Path) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """(tokens, features, prompt length) per sequence from a `build_feature_cache` folder."""

    data = []
    for path in sorted(Path(folder).glob("shard-*.safetensors")):
        t = load_file(str(path))
        for key in sorted(k for k in t if k.endswith(".tokens")):
            stem = key[: -len(".tokens")]
            data.append((t[key], t[stem + ".features"], int(t[stem + ".prompt_len"][0])))
    return data
