"""Teacher-forced accuracy of draft heads on held-out answers, per drafting depth (issue #15's accuracy goal).

For each head folder (leanlm EAGLE-1 or speculators EAGLE-3): next-token top-1 accuracy of the head fed the
target's features (depth 1) and, with `--depths`, of the head fed its own predicted features / outputs (depths 2,
3, ...: the training-time-test forward, as when drafting a chain), on

- MT-bench: the 80 first-turn questions, answered greedily by the target (`--max-new-tokens` tokens), features
  cached under .cache/draft-eval-mtbench-<target> (EAGLE-1 and EAGLE-3 layouts each once);
- ShareGPT held-out: the conversations of a held-out feature cache (`--sharegpt-heldout`, e.g. the 200 of
  .cache/draft-sharegpt-smollm2/held-out), EAGLE-1 heads only (that cache holds last hidden states).

    python benchmarks/draft_accuracy.py --heads assets/draft-smollm2,runs/draft-sharegpt \\
        --sharegpt-heldout .cache/draft-sharegpt-smollm2/held-out --out docs/results/draft-accuracy.json

Writes JSON, a markdown table and a plot (accuracy by depth) beside it; `--plot-from a.json,b.json --out c.json`
plots the rows of earlier runs together into c.png. Two accuracies per depth: `acc`, the head's top-1 against the data's
next token (an answer token outside a head's draft vocabulary is a miss: it cannot be drafted), and `greedy` (EAGLE-1
heads), against the target's own greedy token over its whole vocabulary, read from the cached features -- what
verification accepts. On the MT-bench set (the target's greedy answers) the two agree; on ShareGPT's answers,
which the target did not write, only `greedy` measures what acceptance needs.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from leanlm.inference import load_model_and_tokenizer
from leanlm.speculative.eagle3 import Eagle3DraftHead
from leanlm.speculative.heads import load_head
from leanlm.speculative.prompts import load_prompts
from leanlm.speculative.train_draft import (DraftTrainConfig, build_feature_cache, evaluate_head,
                                            load_feature_cache)


def mtbench_cache(model, tokenizer, target: str, max_new_tokens: int, layers) -> Path:
    root = Path(os.environ.get("LEANLM_CACHE", ".cache"))
    tag = "last" if layers is None else "layers" + "-".join(map(str, layers))
    folder = root / f"draft-eval-mtbench-{Path(target).name}-{max_new_tokens}-{tag}"
    build_feature_cache(model, tokenizer, load_prompts("mtbench"), folder, max_new_tokens, batch_size=40,
                        shard_prompts=80, feature_layers=layers)
    return folder


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy against the target's greedy token by drafting depth, one line per head, one panel per set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(r["set"] for r in rows))
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 3.6), dpi=110, squeeze=False)
    for ax, name in zip(axes[0], sets):
        for r in (r for r in rows if r["set"] == name):
            greedy = r.get("acc_greedy_by_depth") or r["acc_by_depth"]  # EAGLE-3 rows have no greedy figure
            accs = [a if g is None else g for a, g in zip(r["acc_by_depth"], greedy)]
            ax.plot(range(1, len(accs) + 1), accs, marker="o", label=r["head"])
        ax.set(title=name, xlabel="drafting depth", ylabel="top-1 = target's greedy token", ylim=(0, None))
        ax.set_xticks(range(1, max(len(r["acc_by_depth"]) for r in rows) + 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="smollm2")
    ap.add_argument("--heads", required=True, help="comma-separated head folders")
    ap.add_argument("--sharegpt-heldout", default=None, help="held-out ShareGPT feature cache (EAGLE-1 layout)")
    ap.add_argument("--sharegpt-limit", type=int, default=100, help="first N held-out conversations scored")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--depths", type=int, default=3, help="drafting depths scored (1 = teacher forcing only)")
    ap.add_argument("--out", default="docs/results/draft-accuracy.json")
    ap.add_argument("--plot-from", default=None, help="comma-separated JSON files of earlier runs: plot their rows "
                    "together into --out's .png (no model is loaded)")
    args = ap.parse_args()
    if args.plot_from:
        rows, seen = [], set()
        for f in args.plot_from.split(","):
            for r in json.loads(Path(f).read_text())["rows"]:
                if (r["head"], r["set"]) not in seen:  # a head scored in two runs is plotted once
                    seen.add((r["head"], r["set"]))
                    rows.append(r)
        plot(rows, Path(args.out).with_suffix(".png"))
        return
    torch.set_grad_enabled(False)
    model, tokenizer = load_model_and_tokenizer(args.target)
    embed, lm_head = model.get_input_embeddings(), model.get_output_embeddings()
    rows = []
    for path in [h for h in args.heads.split(",") if h]:
        head, _ = load_head(path, model.config)
        head.eval()
        layers = head.feature_layers
        sets = {"mtbench": load_feature_cache(mtbench_cache(model, tokenizer, args.target, args.max_new_tokens,
                                                            layers))}
        if args.sharegpt_heldout and not isinstance(head, Eagle3DraftHead):
            sets["sharegpt-heldout"] = load_feature_cache(args.sharegpt_heldout)[: args.sharegpt_limit]
        for name, data in sets.items():
            t0 = time.perf_counter()
            st = evaluate_head(head, embed, lm_head, data, DraftTrainConfig(ttt_steps=args.depths - 1))
            accs = [st["acc"]] + [st.get(f"acc_step{d}") for d in range(1, args.depths)]
            greedy = [st.get("acc_greedy")] + [st.get(f"acc_greedy_step{d}") for d in range(1, args.depths)]
            vocab = None if head.draft_vocab is None else len(head.draft_vocab)
            rows.append({"head": path, "arch": head.arch, "draft_vocab": vocab, "set": name,
                         "sequences": len(data), "answer_tokens": st["tokens"], "acc_by_depth": accs,
                         "acc_greedy_by_depth": greedy, "seconds": time.perf_counter() - t0})
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"target": args.target, "max_new_tokens": args.max_new_tokens, "rows": rows},
                              indent=1))
    fmt = lambda xs: " | ".join("-" if a is None else f"{a:.3f}" for a in xs)  # noqa: E731
    lines = ["| head | arch | draft vocab | set | answer tokens | " +
             " | ".join(f"acc depth {d}" for d in range(1, args.depths + 1)) + " | " +
             " | ".join(f"greedy depth {d}" for d in range(1, args.depths + 1)) + " |",
             "|---" * (5 + 2 * args.depths) + "|"]
    for r in rows:
        lines.append(f"| {r['head']} | {r['arch']} | {r['draft_vocab'] or 'full'} | {r['set']} | "
                     f"{r['answer_tokens']:,} | {fmt(r['acc_by_depth'])} | {fmt(r['acc_greedy_by_depth'])} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(rows, out.with_suffix(".png"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
