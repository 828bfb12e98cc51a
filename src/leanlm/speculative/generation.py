"""`generate()` for speculative decoding, shaped like Hugging Face's `model.generate`.

    from leanlm.speculative import generate   # defined in leanlm/speculative/generation.py
    out = generate(model, input_ids, draft="assets/draft-smollm2-sharegpt", strategy="c2t",
                   classifier="assets/c2t-smollm2-sharegpt", max_new_tokens=128, do_sample=False,
                   streamer=TextStreamer(tokenizer))
    text = tokenizer.decode(out[0, input_ids.shape[1]:])

It returns the prompt followed by the new tokens as a LongTensor [B, T + new] on the prompt's device, like
`model.generate` (rows that stop early at `eos_token_id` are right-padded with `pad_token_id`). Greedy output is
token-identical to `model.generate(do_sample=False)`; sampled output is distributed as plain sampling with the same
temperature / top-k / top-p (the verification is lossless, see `leanlm.speculative.verify`). A streamer
(transformers' `TextStreamer`, `TextIteratorStreamer` or any `BaseStreamer`) receives the prompt first and then
each step's accepted tokens, as with `model.generate`; streaming needs batch size 1.

Batch size 1 runs `SpeculativeDecoder`; B > 1 runs `BatchedSpeculativeDecoder` (one target forward per step for all
rows, each with its own tree). `attention_mask` (left padding) is honoured by dropping each row's padded positions.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from leanlm.speculative.heads import DraftHead, load_head
from leanlm.speculative.engine import SpeculativeDecoder
from leanlm.speculative.strategies import make_strategy
from leanlm.speculative.tree import TreeStrategy


def _strategy(strategy: str | TreeStrategy, classifier, beta: float | None, kwargs: dict) -> TreeStrategy:
    if isinstance(strategy, TreeStrategy):
        return strategy
    if strategy == "c2t":
        if classifier is None:
            raise ValueError("strategy='c2t' needs classifier= (a C2TClassifier or a folder written by "
                             "`leanlm spec c2t-train`)")
        kwargs = {"classifier": classifier, **({"beta": beta} if beta is not None else {}), **kwargs}
    return make_strategy(strategy, **kwargs)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, draft: DraftHead | str | Path, strategy: str | TreeStrategy = "eagle2",
             max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0, top_k: int = 50,
             top_p: float = 1.0, eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             attention_mask: torch.Tensor | None = None, streamer=None, seed: int = 0, classifier=None,
             beta: float | None = None, compile: bool | str = False, **strategy_kwargs) -> torch.LongTensor:
    """Speculative decoding of `input_ids` [B, T] with draft head `draft` and tree `strategy` (`chain`, `static`,
    `eagle2`, `c2t` or a `TreeStrategy`; extra keywords go to the strategy, e.g. `total_tokens=30`). Arguments
    named as in `model.generate` mean what they mean there; `eos_token_id` defaults to the model's generation config.
    `compile` ("auto" / "on" / "off") compiles the target's steps (see `leanlm.speculative.target`).
    Returns [B, T + new] token ids."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, length] with length >= 1, got shape {tuple(input_ids.shape)}")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if do_sample and not temperature > 0:
        raise ValueError(f"do_sample=True needs temperature > 0, got {temperature}")
    head = load_head(draft, model.config)[0] if isinstance(draft, (str, Path)) else draft
    head = head.to(next(model.parameters()).device)
    tree = _strategy(strategy, classifier, beta, strategy_kwargs)
    gen_cfg = getattr(model, "generation_config", None)
    if eos_token_id is None:
        eos_token_id = getattr(gen_cfg, "eos_token_id", None) or getattr(model.config, "eos_token_id", None)
    if pad_token_id is None:
        pad_token_id = getattr(gen_cfg, "pad_token_id", None)
        if pad_token_id is None:
            first = eos_token_id[0] if isinstance(eos_token_id, list) and eos_token_id else eos_token_id
            pad_token_id = first if isinstance(first, int) else 0
    sampling = {"temperature": temperature if do_sample else 0.0, "top_k": top_k if do_sample else 0,
                "top_p": top_p if do_sample else 1.0}
    decoder = SpeculativeDecoder(model, head, tree, compile=compile)
    rows = [row[mask.bool()] if attention_mask is not None else row
            for row, mask in zip(input_ids, attention_mask if attention_mask is not None else input_ids)]
    if len(rows) == 1:
        if streamer is not None:
            streamer.put(rows[0].cpu())
        put = (lambda new: streamer.put(torch.tensor(new))) if streamer is not None else None
        new, _ = decoder.generate(rows[0][None], max_new_tokens, eos_token_id=eos_token_id, seed=seed, on_tokens=put,
                                  **sampling)
        if streamer is not None:
            streamer.end()
        outs = [new]
    else:
        if streamer is not None:
            raise ValueError("streamers support batch size 1 only (as in transformers' generate)")
        outs, _, _ = decoder.generate_batch([r.tolist() for r in rows], max_new_tokens, eos_token_id=eos_token_id,
                                            seed=seed, **sampling)
    width = max(len(o) for o in outs)
    tail = torch.full((len(outs), width), pad_token_id, dtype=torch.long)
    for i, o in enumerate(outs):
        tail[i, : len(o)] = torch.tensor(o, dtype=torch.long)
    return torch.cat([input_ids.cpu(), tail], dim=1).to(input_ids.device)


@torch.no_grad()
def decode_text(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, head: DraftHead | None = None,
                strategy: TreeStrategy | None = None, temperature: float = 0.0, top_k: int = 0, seed: int = 0,
                compile: bool | str = False, on_text=None):
    """Plain (`strategy=None`) or speculative decoding of one prompt through leanlm's backend, with the text
    streamed to `on_text(piece)` as tokens arrive (special tokens skipped). Returns (answer text, `SpecStats`)."""
    done: list[int] = []
    printed = 0

    def stream(new: list[int]) -> None:
        nonlocal printed
        done.extend(new)
        text = tokenizer.decode(done, skip_special_tokens=True)
        if on_text is not None and len(text) > printed:
            on_text(text[printed:])
        printed = len(text)

    if head is not None:
        head = head.to(next(model.parameters()).device)
    decoder = SpeculativeDecoder(model, head, strategy, compile=compile)
    if compile in ("on", True) and decoder.target.compile_stats.failed:
        print(f"note: --compile on: {decoder.target.compile_stats.failed}", file=sys.stderr)
    _, stats = decoder.generate(torch.tensor([prompt_ids]), max_new_tokens, temperature=temperature, top_k=top_k,
                                seed=seed, eos_token_id=tokenizer.eos_token_id, on_tokens=stream)
    return tokenizer.decode(done, skip_special_tokens=True), stats
