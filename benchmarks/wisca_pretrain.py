"""WISCA pre-training experiment: baseline vs WISCA vs a learning-rate control, GQA group sizes 4 and 1, several seeds.

Every run trains the same small leanlm model from scratch on the bundled corpus for the same number of tokens;
runs with the same seed share initial weights and data order. Variants:

    baseline   plain AdamW training
    wisca      QK_TEN + VO_TEN transitions at step 0 and every `--every` steps (weights rescaled, Adam state kept)
    lr-control no rescaling; at the same steps each of W_q, W_k, W_v, W_o gets its learning rate multiplied by the
               1/f that a WISCA transition would have applied to it (f = its rescaling factor), which is what a
               rescaling amounts to for Adam's effective step size (wisca.md, section 3.1)

    python benchmarks/wisca_pretrain.py                    # CPU scale: 300 steps, 3 seeds, 2 runs at a time
    python benchmarks/wisca_pretrain.py --steps 2000 --hidden 512 --layers 8 --jobs 1   # larger, e.g. on a GPU

Writes docs/results/wisca-pretrain.json and wisca-pretrain.png (validation loss curves and final perplexity).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
VARIANTS = {"baseline": None, "wisca": {"apply": "weights"}, "lr-control": {"apply": "lr"}}


def run_config(args, group: int, variant: str, seed: int, out_dir: Path) -> dict:
    kv = args.heads // group
    raw = {
        "model": {"vocab_size": args.vocab, "hidden_size": args.hidden, "num_hidden_layers": args.layers,
                  "num_attention_heads": args.heads, "num_key_value_heads": kv, "max_position_embeddings": 512},
        "data": {"source": "bundled", "seq_len": args.seq_len},
        "train": {"out_dir": str(out_dir), "max_steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                  "warmup_steps": max(1, args.steps // 10), "eval_every": max(1, args.steps // 6),
                  "eval_batches": args.eval_batches, "ckpt_every": 0, "keep_checkpoints": 1, "seed": seed,
                  "num_threads": args.threads, "progress": False, "resume": "never", "log_every": 10},
    }
    if VARIANTS[variant] is not None:
        raw["wisca"] = {"every": args.every, "at_init": True, **VARIANTS[variant]}
    return raw


def one_run(args, group: int, variant: str, seed: int) -> dict:
    out_dir = Path(args.work) / f"g{group}-{variant}-s{seed}"
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = out_dir / "config.yaml"
    cfg.write_text(yaml.safe_dump(run_config(args, group, variant, seed, out_dir)))
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "leanlm", "train", str(cfg)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if proc.returncode != 0:
        raise RuntimeError(f"run {out_dir.name} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    train = [r["loss"] for r in rows if "loss" in r]
    wisca_s = sum(r["wisca_seconds"] for r in rows if "wisca_seconds" in r)
    return {"group": group, "variant": variant, "seed": seed, "val_curve": val, "final_val_loss": val[-1][1],
            "final_val_ppl": math.exp(val[-1][1]), "final_train_loss_last_2_logs": statistics.mean(train[-2:]),
            "seconds": time.perf_counter() - t, "wisca_seconds": wisca_s}


def summarise(runs: list[dict], groups: list[int]) -> dict:
    table = {}
    for g in groups:
        base = [r["final_val_ppl"] for r in runs if r["group"] == g and r["variant"] == "baseline"]
        for v in VARIANTS:
            ppl = [r["final_val_ppl"] for r in runs if r["group"] == g and r["variant"] == v]
            entry = {"mean": statistics.mean(ppl), "std": statistics.stdev(ppl) if len(ppl) > 1 else 0.0, "n": len(ppl)}
            paired = [p / b - 1 for p, b in zip(ppl, base)]  # same seed = same init and data order
            entry["rel_change_vs_baseline_mean"] = statistics.mean(paired)
            entry["rel_change_vs_baseline_std"] = statistics.stdev(paired) if len(paired) > 1 else 0.0
            table[f"g{g}/{v}"] = entry
    return table


def plot(runs: list[dict], groups: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 3.8), dpi=110, squeeze=False)
    colors = {"baseline": "tab:gray", "wisca": "tab:blue", "lr-control": "tab:orange"}
    for ax, g in zip(axes[0], groups):
        for v in VARIANTS:
            curves = [r["val_curve"] for r in runs if r["group"] == g and r["variant"] == v]
            steps = [s for s, _ in curves[0]]
            mean = [statistics.mean(c[i][1] for c in curves) for i in range(len(steps))]
            ax.plot(steps, mean, "o-", color=colors[v], label=v, lw=1.4, ms=3)
            for c in curves:
                ax.plot(steps, [x for _, x in c], color=colors[v], alpha=0.25, lw=0.8)
        ax.set_title(f"GQA group size {g}")
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss")
        ax.set_ylim(top=min(ax.get_ylim()[1], 7.0))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--groups", type=int, nargs="+", default=[4, 1])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-batches", type=int, default=20)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=str(ROOT / ".cache" / "bench" / "wisca-pretrain"))
    ap.add_argument("--tag", default="wisca-pretrain")
    args = ap.parse_args()

    from leanlm.data import DataConfig, prepare_data

    prepare_data(DataConfig(source="bundled", seq_len=args.seq_len), args.vocab)  # build the cache once
    jobs = [(g, v, s) for s in args.seeds for g in args.groups for v in VARIANTS]
    from tqdm import tqdm

    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(tqdm(pool.map(lambda j: one_run(args, *j), jobs), total=len(jobs), desc="runs"))
    table = summarise(runs, args.groups)
    train_s = statistics.median(r["seconds"] for r in runs if r["variant"] == "wisca")
    n_trans = 1 + (args.steps - 1) // args.every
    wisca_s = statistics.median(r["wisca_seconds"] for r in runs if r["variant"] == "wisca")
    per_transition = wisca_s / n_trans
    step_s = train_s / args.steps
    result = {"args": vars(args), "table": table, "runs": runs,
              "overhead": {"seconds_per_transition": per_transition, "median_step_seconds_incl_eval": step_s,
                           "fraction_at_every_250": per_transition / (250 * step_s)}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(runs, args.groups, RESULTS / f"{args.tag}.png")
    print(f"{'setting':<20} {'val ppl mean':>12} {'std':>8} {'vs baseline':>12}")
    for k, e in table.items():
        print(f"{k:<20} {e['mean']:>12.2f} {e['std']:>8.2f} {100 * e['rel_change_vs_baseline_mean']:>+11.2f}%")
    print(f"transition: {per_transition * 1000:.1f} ms; at every 250 steps that is "
          f"{100 * result['overhead']['fraction_at_every_250']:.4f}% of training time")


if __name__ == "__main__":
    main()
