"""Would a bfloat16 target make tree verification cheap on this CPU, and would its output stay token-identical?

    python benchmarks/verify_dtype.py --out docs/results/verify-dtype          # about 5 minutes, one thread

Three measurements, fp32 against bf16, round-robin over the two so the machine's noise hits both alike:
  gemm      SmolLM2-135M's linear layers (30 x q/k/v/o/gate/up/down, then the LM head) through `F.linear` over
            1..16 rows: what a tree's width costs the matrix products alone
  step      the whole eager target step over n tree tokens after 256 cached ones (`cost.verify_seconds`)
  identity  on the first --prompts MT-bench questions, greedy: leanlm's plain decoding against HF `generate` in the
            same dtype, and EAGLE-2 (--strategies) against leanlm's plain decoding in the same dtype
Writes <out>.json, <out>.md and <out>.png (step cost relative to a 1-token step, per dtype).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from decode_speed import measure_steps, plot_steps  # noqa: E402 - the same step timing and plot as decode_speed.py


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--widths", default="1,2,4,8,16,32,64")
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--strategies", default="eagle2:total_tokens=16:depth=5:top_k=8,eagle2")
    p.add_argument("--draft", default=str(ROOT / "assets" / "draft-smollm2-sharegpt"))
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "verify-dtype"))
    args = p.parse_args()
    os.environ.setdefault("LEANLM_CACHE", str(ROOT / ".cache"))
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    from leanlm.inference import load_model_and_tokenizer
    from leanlm.speculative.draft import EagleDraftHead
    from leanlm.speculative.engine import SpeculativeDecoder
    from leanlm.speculative.prompts import encode_chat, load_prompts
    from leanlm.speculative.strategies import parse_strategy
    from leanlm.speculative.target import make_target

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    widths = [int(w) for w in args.widths.split(",")]
    fp32_model, tok = load_model_and_tokenizer("smollm2")
    c = fp32_model.config
    layer = [(c.hidden_size, c.hidden_size), (c.num_key_value_heads * c.head_dim, c.hidden_size)] * 2 + [
        (c.intermediate_size, c.hidden_size)] * 2 + [(c.hidden_size, c.intermediate_size)]
    shapes = layer * c.num_hidden_layers + [(c.vocab_size, c.hidden_size)]
    g = torch.Generator().manual_seed(0)
    weights = {k: [torch.randn(o, i, generator=g).to(dt) for o, i in shapes] for k, dt in dtypes.items()}

    def gemm_seconds(name: str, rows: int) -> float:
        x = {i: torch.randn(rows, i, generator=g).to(dtypes[name]) for i in {s[1] for s in shapes}}
        t = time.perf_counter()
        for w in weights[name]:
            F.linear(x[w.shape[1]], w)
        return time.perf_counter() - t

    gemm = {k: {n: [] for n in widths[:5]} for k in dtypes}
    for _ in range(args.rounds):
        for k in dtypes:
            for n in gemm[k]:
                gemm_seconds(k, n)  # warm-up
                gemm[k][n].append(gemm_seconds(k, n))
    gemm_ms = {k: {n: 1000 * statistics.median(v) for n, v in r.items()} for k, r in gemm.items()}
    weights.clear()  # free the GEMM probe's weights before the models
    models = {"float32": fp32_model}
    models["bfloat16"], _ = load_model_and_tokenizer("smollm2")
    models["bfloat16"].to(torch.bfloat16)
    targets = {k: make_target(m) for k, m in models.items()}
    step_ms = measure_steps(targets, widths, args.rounds)

    prompts = [encode_chat(tok, q) for q in load_prompts("mtbench", args.prompts)]
    eos = tok.eos_token_id
    strategies = [s for s in args.strategies.split(",") if s]
    identity = {k: {"plain_vs_hf": 0, **{s: 0 for s in strategies}} for k in dtypes}
    speed = {k: {s: [] for s in strategies} for k in dtypes}
    for k, model in models.items():
        head, _ = EagleDraftHead.load(args.draft, model.config)
        for ids in prompts:
            x = torch.tensor([ids])
            with torch.no_grad():
                y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.max_new_tokens,
                                   do_sample=False, eos_token_id=eos, pad_token_id=eos)
                t = time.perf_counter()
                plain, _ = SpeculativeDecoder(targets[k], None, None).generate(x, args.max_new_tokens,
                                                                               eos_token_id=eos)
                t_plain = time.perf_counter() - t
                identity[k]["plain_vs_hf"] += plain == y[0, x.shape[1]:].tolist()
                for s in strategies:
                    t = time.perf_counter()
                    new, _ = SpeculativeDecoder(targets[k], head, parse_strategy(s)).generate(
                        x, args.max_new_tokens, eos_token_id=eos)
                    speed[k][s].append(t_plain / (time.perf_counter() - t))
                    identity[k][s] += new == plain
    result = {"command": "verify_dtype.py " + " ".join(sys.argv[1:]), "torch": torch.__version__,
              "gemm_ms": gemm_ms, "step_ms": step_ms, "prompts": len(prompts), "identity": identity,
              "speculative_vs_plain_same_dtype": {k: {s: statistics.median(v) for s, v in r.items()}
                                                  for k, r in speed.items()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = ["| rows / tree tokens n | " + " | ".join(f"{k} GEMMs ms | {k} step ms | {k} step / 1-token step"
                                                      for k in dtypes) + " |",
             "|---|" + "---|---|---|" * len(dtypes)]
    for n in widths:
        cells = []
        for k in dtypes:
            gm = f"{gemm_ms[k][n]:.1f}" if n in gemm_ms[k] else ""
            cells.append(f"{gm} | {step_ms[k][n]:.1f} | {step_ms[k][n] / step_ms[k][1]:.2f}x")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "| dtype | plain = HF generate (same dtype) | " + " | ".join(
        f"{s} = plain | {s} speed vs plain (median)" for s in strategies) + " |",
              "|---|---|" + "---|---|" * len(strategies)]
    for k in dtypes:
        lines.append(f"| {k} | {identity[k]['plain_vs_hf']}/{len(prompts)} | " + " | ".join(
            f"{identity[k][s]}/{len(prompts)} | {result['speculative_vs_plain_same_dtype'][k][s]:.2f}x"
            for s in strategies) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot_steps(out.with_suffix(".png"), widths, {k: {n: v[n] / v[1] for n in widths} for k, v in step_ms.items()},
               "step time / 1-token step (same dtype)", "SmolLM2-135M eager target step, one CPU thread")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
