"""C2T against EAGLE-2 on one target and draft head: τ against candidate tokens per step, and wall-clock.

Side by side in one run, every prompt decoded plainly and with every configuration back to back (greedy; outputs
checked identical to plain decoding):
  - EAGLE-2 with total_tokens swept (same top_k and depth for every point);
  - C2T with beta swept (same top_k / max depth), using a classifier from `leanlm spec c2t-train`;
  - C2T with the cost-aware beta: verification cost of n tokens, the draft cost of one layer and the engine's
    per-step overhead are measured on this machine first, then `leanlm.speculative.c2t.cost_aware_beta` picks beta
    from the collected trees;
  - EAGLE-2 sized by the same cost model (`leanlm.speculative.cost.cost_aware_eagle2`: total_tokens and depth);
  - batched decoding (several prompts per target forward) for the default C2T and EAGLE-2 points.
Reported: τ, γ (candidates verified per step, root included), draft/verify ms per step, tokens/s, speed-up over
plain decoding, the candidate-token reduction of C2T at equal τ (EAGLE-2's γ(τ) curve interpolated at C2T's τ) and
tokens/s at equal τ.

    python benchmarks/c2t_vs_eagle2.py --draft assets/draft-smollm2 --classifier assets/c2t-smollm2 \\
        --c2t-data .cache/c2t/trees.safetensors --limit 20 --max-new-tokens 64

Writes docs/results/c2t.json, c2t-tables.md and c2t.png (docs/results/c2t.md is the results page around them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"


def interpolate(xs: list[float], ys: list[float], x: float) -> float | None:
    """Linear interpolation of y(x) on points sorted by x; None outside their range."""
    pts = sorted(zip(xs, ys))
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="smollm2")
    ap.add_argument("--draft", required=True)
    ap.add_argument("--classifier", required=True)
    ap.add_argument("--c2t-data", default=None, help="trees from c2t-collect, for the cost-aware beta")
    ap.add_argument("--prompts", default="mtbench")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--totals", default="8,16,30,60", help="EAGLE-2 total_tokens sweep")
    ap.add_argument("--betas", default="0.2,0.35,0.5,0.7", help="C2T beta sweep")
    ap.add_argument("--batch", type=int, default=4, help="rows per batch for the batched comparison (0 = skip)")
    ap.add_argument("--out", default=str(RESULTS / "c2t.json"))
    args = ap.parse_args(argv)

    import torch

    from leanlm.inference import load_model_and_tokenizer
    from leanlm.speculative.bench import markdown, run_bench
    from leanlm.speculative.c2t import C2T, C2TClassifier
    from leanlm.speculative.c2t_train import cost_aware_beta, load_rows
    from leanlm.speculative.cost import cost_aware_eagle2, draft_layer_seconds, step_overhead_seconds, verify_seconds
    from leanlm.speculative.draft import EagleDraftHead
    from leanlm.speculative.eval_sets import load_eval_prompts
    from leanlm.speculative.prompts import encode_chat
    from leanlm.speculative.tree import Eagle2

    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(args.target)
    head, _ = EagleDraftHead.load(args.draft, model.config)
    clf, clf_meta = C2TClassifier.load(args.classifier)
    k, depth = args.top_k, args.depth
    strategies = {}
    for n in [int(x) for x in args.totals.split(",")]:
        strategies[f"eagle2 N={n}"] = Eagle2(total_tokens=n, depth=depth, top_k=k)
    for b in [float(x) for x in args.betas.split(",")]:
        strategies[f"c2t beta={b}"] = C2T(clf, beta=b, top_k=k, max_depth=depth, second_topk=k)

    costs = None
    if args.c2t_data:
        sizes = [1, 2, 4, 8, 16, 32, 64, 128]
        vs = verify_seconds(model, sizes, context=256, repeats=5)
        ds = draft_layer_seconds(head, model, width=k, context=256, repeats=5)
        over = step_overhead_seconds(model, head, vs, ds, top_k=k)  # the engine's work outside both forwards
        rows, _ = load_rows(args.c2t_data)
        beta, table = cost_aware_beta(clf, rows, vs, ds, overhead_seconds=over["tree"])
        costs = {"verify_seconds": vs, "draft_layer_seconds": ds, "overhead_seconds": over, "beta": beta,
                 "table": table}
        print(f"verify seconds by tree size: { {n: round(s * 1000, 1) for n, s in vs.items()} } ms; one draft "
              f"layer {ds * 1000:.1f} ms; step overhead {over['tree'] * 1000:.1f} ms -> cost-aware beta {beta}")
        strategies[f"c2t cost-aware beta={beta}"] = C2T(clf, beta=beta, top_k=k, max_depth=depth, second_topk=k)
        # EAGLE-2 sized by the same cost model (total_tokens and depth)
        e2, _ = cost_aware_eagle2(rows, vs, ds, overhead_seconds=over["tree"])
        costs["eagle2"] = {key: e2[key] for key in ("total_tokens", "depth", "tau", "nodes", "tokens_per_second")}
        print(f"cost-aware EAGLE-2: total_tokens {e2['total_tokens']}, depth {e2['depth']}")
        strategies[f"eagle2 cost-aware N={e2['total_tokens']} depth={e2['depth']}"] = Eagle2(
            total_tokens=e2["total_tokens"], depth=e2["depth"], top_k=k)

    prompts = {s: load_eval_prompts(s, args.limit) for s in args.prompts.split(",")}
    rows = run_bench(model, tok, head, strategies, prompts, args.max_new_tokens)
    table = markdown(rows)
    print(table)

    # equal-τ comparison against EAGLE-2's curve
    equal = []
    for set_name in prompts:
        e = [r for r in rows if r["prompts"] == set_name and r["strategy"].startswith("eagle2 N=")]  # the sweep
        for r in rows:
            if r["prompts"] != set_name or not r["strategy"].startswith("c2t"):
                continue
            g = interpolate([x["tau"] for x in e], [x["candidates_per_step"] for x in e], r["tau"])
            t = interpolate([x["tau"] for x in e], [x["tokens_per_s"] for x in e], r["tau"])
            equal.append({"prompts": set_name, "strategy": r["strategy"], "tau": r["tau"],
                          "c2t_candidates": r["candidates_per_step"], "eagle2_candidates_at_tau": g,
                          "reduction": None if g is None else 1 - r["candidates_per_step"] / g,
                          "c2t_tokens_per_s": r["tokens_per_s"], "eagle2_tokens_per_s_at_tau": t})

    batch_rows = []
    if args.batch > 1:
        from leanlm.speculative.engine import BatchedSpeculativeDecoder
        from leanlm.speculative.engine import SpeculativeDecoder

        ps = [encode_chat(tok, p) for p in next(iter(prompts.values()))][: 2 * args.batch]
        for name in ("eagle2 N=60" if "eagle2 N=60" in strategies else next(iter(strategies)), "c2t beta=0.5"):
            if name not in strategies:
                continue
            strat = strategies[name]
            single = [SpeculativeDecoder(model, head, strat).generate(torch.tensor([p]), args.max_new_tokens,
                                                                      eos_token_id=tok.eos_token_id) for p in ps]
            single_s = sum(st.draft_seconds + st.verify_seconds for _, st in single)
            outs, secs = [], 0.0
            for i in range(0, len(ps), args.batch):
                chunk = ps[i:i + args.batch]
                o, _, tot = BatchedSpeculativeDecoder(model, head, strat).generate(
                    chunk, args.max_new_tokens, eos_token_id=tok.eos_token_id)
                outs += o
                secs += tot["draft_seconds"] + tot["verify_seconds"]
            same = sum(a == b for a, (b, _) in zip(outs, single))
            tokens = sum(len(o) - 1 for o in outs)
            batch_rows.append({"strategy": name, "batch": args.batch, "prompts": len(ps),
                               "batched_tokens_per_s": tokens / secs,
                               "single_tokens_per_s": sum(len(o) - 1 for o, _ in single) / single_s,
                               "identical_to_single": same})
            print(batch_rows[-1])

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                               "classifier": clf_meta.get("chosen"), "rows": rows, "equal_tau": equal,
                               "costs": costs, "batched": batch_rows}, indent=1, default=str))
    lines = [table, "", "| prompts | C2T point | τ | C2T γ | EAGLE-2 γ at equal τ | γ reduction | C2T tok/s | "
             "EAGLE-2 tok/s at equal τ |", "|---|---|---|---|---|---|---|---|"]
    for e in equal:
        fmt = (lambda v, f: "n/a (outside EAGLE-2's range)" if v is None else format(v, f))
        lines.append(f"| {e['prompts']} | {e['strategy']} | {e['tau']:.2f} | {e['c2t_candidates']:.1f} | "
                     f"{fmt(e['eagle2_candidates_at_tau'], '.1f')} | {fmt(e['reduction'], '.1%')} | "
                     f"{e['c2t_tokens_per_s']:.1f} | {fmt(e['eagle2_tokens_per_s_at_tau'], '.1f')} |")
    out.with_name(out.stem + "-tables.md").write_text("\n".join(lines) + "\n")
    plot(out.with_suffix(".png"), rows, costs)
    return 0


def plot(path: Path, rows: list[dict], costs: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 3 if costs else 2
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 3.8), dpi=110)
    for family, marker in (("eagle2 N=", "o-"), ("eagle2 cost-aware", "P"), ("c2t beta", "s-"),
                           ("c2t cost-aware", "*")):
        pts = [r for r in rows if r["strategy"].startswith(family)]
        if not pts:
            continue
        pts.sort(key=lambda r: r["candidates_per_step"])
        label = {"eagle2 N=": "EAGLE-2 (total_tokens sweep)", "eagle2 cost-aware": "EAGLE-2 cost-aware size",
                 "c2t beta": "C2T (beta sweep)", "c2t cost-aware": "C2T cost-aware beta"}[family]
        big = 10 if "cost-aware" in family else 5
        axes[0].plot([r["candidates_per_step"] for r in pts], [r["tau"] for r in pts], marker, label=label, ms=big)
        axes[1].plot([r["tau"] for r in pts], [r["tokens_per_s"] for r in pts], marker, label=label, ms=big)
    plain = [r["tokens_per_s"] for r in rows if r["strategy"] == "none"]
    if plain:
        axes[1].axhline(plain[0], color="k", lw=0.7, ls="--", label="plain decoding")
    axes[0].set(xlabel="candidate tokens verified per step (γ)", ylabel="τ (accepted draft tokens / step)",
                title="acceptance vs verification size")
    axes[1].set(xlabel="τ", ylabel="tokens/s", title="wall-clock (this machine)")
    if costs:
        vs = costs["verify_seconds"]
        axes[2].plot(list(vs), [1000 * s for s in vs.values()], "o-")
        axes[2].set(xscale="log", xlabel="tree tokens verified", ylabel="ms per target forward",
                    title="measured verification cost")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
