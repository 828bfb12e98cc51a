"""Reduced draft vocabulary (FR-Spec / EAGLE-3's d2t): coverage of answer tokens and draft cost per vocabulary size.

    python benchmarks/draft_vocab.py                  # 2000 ShareGPT training conversations, sizes 4k..full

Coverage: the N most frequent answer ids of the training conversations (ShareGPT V3, SmolLM2's chat template, the
training split of `leanlm.speculative.sharegpt`), measured on those and on the held-out conversations. Draft cost:
one tree layer of 8 nodes through `DraftSession.expand` with the committed SmolLM2 head, whose LM head is restricted
to the N ids (the cost does not depend on the weights being trained for it), interleaved over sizes, median of
`--rounds`; one torch thread. Writes docs/results/draft-vocab.{json,md,png}. tau per N needs a head trained per N
(see docs/results/draft-vocab.md for what is measured so far).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--conversations", type=int, default=2000)
    p.add_argument("--held-out", type=int, default=300)
    p.add_argument("--sizes", default="4096,8192,16384,32768,0", help="0 = the full vocabulary")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "draft-vocab"))
    args = p.parse_args()

    import torch

    from leanlm.inference import load_model_and_tokenizer
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from leanlm.speculative.draft import DraftSession, EagleDraftHead
    from leanlm.speculative.sharegpt import sharegpt_sequences
    from leanlm.speculative.train_draft import answer_token_counts, coverage, select_draft_vocab

    torch.set_num_threads(1)
    model, tok = load_model_and_tokenizer("smollm2")
    v = model.config.vocab_size
    t0 = time.perf_counter()
    seqs, stats = sharegpt_sequences(tok, {"train": args.conversations, "held-out": args.held_out}, args.max_len)
    train, held = seqs["train"], seqs["held-out"]
    encode_s = time.perf_counter() - t0

    def counts(seqs):  # (ids, mask) lists as draft sequences without features
        return answer_token_counts([(torch.tensor(ids), None, torch.tensor(mask)) for ids, mask in seqs], v)

    c_train, c_held = counts(train), counts(held)
    sizes = [int(x) for x in args.sizes.split(",")]
    head, _ = EagleDraftHead.load(ROOT / "assets" / "draft-smollm2", model.config)
    heads = {}
    for n in sizes:
        vocab = None if n == 0 else select_draft_vocab(c_train, n)
        h = EagleDraftHead(head.config, vocab).eval()
        h.load_state_dict({k: w for k, w in head.state_dict().items()}, strict=False)
        heads[n] = (h, vocab)
    emb, lm = model.get_input_embeddings(), model.get_output_embeddings()
    feats = torch.randn(64, model.config.hidden_size)
    tokens = torch.randint(0, v, (64,))
    ms: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(args.rounds):
        for n in sizes:  # interleaved, so machine noise hits every size alike
            s = DraftSession(heads[n][0], emb, lm)
            s.prefill(feats, tokens)
            nodes = torch.arange(1, 9)
            t = time.perf_counter()
            s.expand(nodes, torch.randint(0, 1000, (8,)), torch.zeros(8, dtype=torch.long))
            ms[n].append((time.perf_counter() - t) * 1000)
    rows = []
    full = statistics.median(ms[0]) if 0 in ms else None
    for n in sizes:
        vocab = heads[n][1]
        med = statistics.median(ms[n])
        rows.append({"size": n or v, "coverage_train": coverage(c_train, vocab), "coverage_held_out":
                     coverage(c_held, vocab), "draft_ms_8_nodes": med,
                     "ratio_to_full": med / full if full else None})
    meta = {"conversations": stats, "held_out_conversations": len(held), "answer_tokens_train": int(c_train.sum()),
            "answer_tokens_held_out": int(c_held.sum()), "encode_seconds": encode_s, "rounds": args.rounds,
            "threads": 1, "machine": "2-core CPU VM (AMD EPYC, AVX2), one torch thread"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["| draft vocabulary | coverage (train answers) | coverage (held-out answers) | draft ms, 8-node layer | "
             "vs full |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']:,} | {r['coverage_train']:.3f} | {r['coverage_held_out']:.3f} | "
                     f"{r['draft_ms_8_nodes']:.2f} | {r['ratio_to_full']:.2f}x |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    ax.plot([r["size"] for r in rows], [r["coverage_held_out"] for r in rows], "o-", label="coverage (held-out)")
    ax.set_xscale("log")
    ax.set_xlabel("draft vocabulary size (ids)")
    ax.set_ylabel("share of answer tokens covered")
    ax2 = ax.twinx()
    ax2.plot([r["size"] for r in rows], [r["draft_ms_8_nodes"] for r in rows], "s--", color="tab:red",
             label="draft ms (8 nodes)")
    ax2.set_ylabel("ms per 8-node draft layer", color="tab:red")
    ax.set_title("Reduced draft vocabulary: SmolLM2-135M, ShareGPT answers")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
