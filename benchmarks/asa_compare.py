"""ASA against full-attention GQA and NSA: same parameter count, same tokens, same data order.

Trains one small leanlm model per attention kind on the bundled corpus (CPU-sized by default), then measures,
side by side:
  - validation perplexity at the training length (from the trainer's evaluation);
  - perplexity by position bucket at 1x / 2x / 4x the training length (does the model hold up past it?);
  - RULER-style long-context tasks (leanlm.evals.longctx) at 1x / 2x / 4x: exact match and answer log-probability;
  - KV-cache bytes per token (exact accounting, leanlm.kvreport) at the evaluated lengths and at 128k;
  - decode tokens/s after a prompt of 2x the training length (median of repeated runs, models interleaved).
Parameter counts are matched by adjusting each model's `intermediate_size` to the GQA model's total.

    python benchmarks/asa_compare.py                 # CPU: 4 layers x 256, 512-token training, ~40 min on 2 cores
    python benchmarks/asa_compare.py --steps 2000 --hidden 512 --layers 8 --seq-len 2048 --window 512 --device cuda

Writes docs/results/asa-compare.json and asa-compare.png.
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
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
KINDS = ("gqa", "nsa", "asa")


def model_fields(args, kind: str, intermediate: int | None = None) -> dict:
    f = {"vocab_size": args.vocab, "hidden_size": args.hidden, "num_hidden_layers": args.layers,
         "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads,
         "max_position_embeddings": 4 * args.seq_len, "attention": kind,
         "nsa_compress_block": args.block, "nsa_compress_stride": args.block, "nsa_select_block": args.block,
         "nsa_select_count": args.select, "nsa_window": args.window,
         "nsa_query_group": args.query_group if kind == "asa" else 1}
    if intermediate:
        f["intermediate_size"] = intermediate
    return f


def matched_intermediate(args) -> dict[str, int]:
    """intermediate_size per kind so that every model has (about) the GQA model's parameter count."""
    import torch

    from leanlm.config import LeanLMConfig
    from leanlm.model import LeanLMForCausalLM

    def count(kind: str, inter: int | None) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in LeanLMForCausalLM(LeanLMConfig(**model_fields(args, kind, inter))).parameters())

    target = count("gqa", None)
    base = LeanLMConfig(**model_fields(args, "gqa")).intermediate_size
    out = {}
    for kind in KINDS:
        per_unit = 3 * args.hidden * args.layers  # gate, up, down
        out[kind] = base + round((target - count(kind, base)) / per_unit)
    return out


def train(args, kind: str, inter: int) -> dict:
    out_dir = Path(args.work) / kind
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = {"model": model_fields(args, kind, inter),
           "data": {"source": "bundled", "seq_len": args.seq_len},
           "train": {"out_dir": str(out_dir), "max_steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                     "warmup_steps": max(1, args.steps // 10), "eval_every": max(1, args.steps // 6),
                     "eval_batches": args.eval_batches, "ckpt_every": args.steps, "keep_checkpoints": 1,
                     "seed": args.seed, "num_threads": args.threads, "progress": False, "resume": "never",
                     "log_every": 10, "device": args.device}}
    cfg = out_dir / "config.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "leanlm", "train", str(cfg)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if proc.returncode != 0:
        raise RuntimeError(f"training {kind} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    return {"kind": kind, "intermediate_size": inter, "val_curve": val, "val_ppl": math.exp(val[-1][1]),
            "train_seconds": time.perf_counter() - t, "dir": str(out_dir)}


def final_model(run_dir: str, device: str):
    from transformers import AutoModelForCausalLM

    import leanlm.model  # noqa: F401
    from leanlm.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(Path(run_dir) / "checkpoints")
    return AutoModelForCausalLM.from_pretrained(ckpt, local_files_only=True).to(device).eval()


def decode_speed(models: dict, prompt, new_tokens: int, repeats: int) -> dict[str, float]:
    """Median decode tokens/s (prefill excluded) per model; models interleaved in every repeat."""
    import torch

    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeats):
        for kind, m in models.items():
            with torch.no_grad():
                cache = m(prompt, use_cache=True).past_key_values
                tok = prompt[:, -1:]
                t = time.perf_counter()
                for _ in range(new_tokens):
                    logits = m(tok, past_key_values=cache, use_cache=True).logits
                    tok = logits[:, -1:].argmax(-1)
                times[kind].append(time.perf_counter() - t)
    return {k: new_tokens / statistics.median(v) for k, v in times.items()}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [r["kind"] for r in result["runs"]]
    colors = {"gqa": "tab:gray", "nsa": "tab:orange", "asa": "tab:blue"}
    fig, axes = plt.subplots(1, 4, figsize=(20, 4), dpi=100)
    ax = axes[0]
    for r in result["runs"]:
        ax.plot([s for s, _ in r["val_curve"]], [math.exp(v) for _, v in r["val_curve"]], "o-", ms=3,
                color=colors[r["kind"]], label=r["kind"])
    ax.set_yscale("log")
    ax.set(title="validation perplexity (training length)", xlabel="step")
    ax.legend()
    ax = axes[1]
    for kind in kinds:
        for mult, style in zip(result["lengths"], ("-", "--", ":")):
            rows = result["position_ppl"][kind][str(mult)]
            ax.plot([(r["from"] + r["to"]) / 2 for r in rows], [r["ppl"] for r in rows], style, marker="o", ms=3,
                    color=colors[kind], label=f"{kind} @{mult}")
    ax.axvline(result["args"]["seq_len"], color="k", lw=0.6)
    ax.set_yscale("log")
    ax.set(title="perplexity by position (line: training length)", xlabel="token position")
    ax.legend(fontsize=7, ncol=3)
    ax = axes[2]
    tasks = sorted({r["task"] for r in result["longctx"]})
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        vals = [statistics.mean(r["answer_logprob_per_token"] for r in result["longctx"]
                                if r["kind"] == kind and r["task"] == t) for t in tasks]
        ax.bar([j + i * width for j in range(len(tasks))], vals, width, color=colors[kind], label=kind)
    ax.set_xticks([j + width for j in range(len(tasks))], tasks, rotation=30, fontsize=7)
    ax.set(title="long-context answer log-prob / token (mean over lengths)")
    ax.legend()
    ax = axes[3]
    kv = [result["kv_bytes_per_token"][k]["131072"] for k in kinds]
    tps = [result["decode_tokens_per_s"][k] for k in kinds]
    ax.bar(kinds, kv, color=[colors[k] for k in kinds])
    ax.set(title="KV bytes/token @128k (bars) | decode tok/s (text)", ylabel="bytes per token")
    for i, (b, s) in enumerate(zip(kv, tps)):
        ax.text(i, b, f"{b:,.0f} B\n{s:.0f} tok/s", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--block", type=int, default=16, help="l = l' = d")
    ap.add_argument("--select", type=int, default=8, help="selected blocks n")
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--query-group", type=int, default=4, help="ASA's query group (NSA runs exact, 1)")
    ap.add_argument("--eval-batches", type=int, default=20)
    ap.add_argument("--ppl-windows", type=int, default=24)
    ap.add_argument("--tasks-n", type=int, default=20, help="samples per long-context task and length")
    ap.add_argument("--decode-repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-train", action="store_true", help="evaluate the runs already in --work")
    ap.add_argument("--work", default=str(ROOT / ".cache" / "bench" / "asa-compare"))
    ap.add_argument("--tag", default="asa-compare")
    args = ap.parse_args()

    import torch

    from leanlm.data import DataConfig, prepare_data
    from leanlm.evals.longctx import TASKS, evaluate_longctx, position_perplexity
    from leanlm.kvreport import cache_bytes

    torch.set_num_threads(args.threads)
    data = prepare_data(DataConfig(source="bundled", seq_len=args.seq_len), args.vocab)
    inter = matched_intermediate(args)
    runs_file = Path(args.work) / "runs.json"
    if args.skip_train:
        runs = json.loads(runs_file.read_text())
    else:
        runs = []
        for kind in KINDS:
            print(f"training {kind} (intermediate_size {inter[kind]}) ...", flush=True)
            runs.append(train(args, kind, inter[kind]))
            print(f"  {kind}: val ppl {runs[-1]['val_ppl']:.2f} in {runs[-1]['train_seconds']:.0f} s", flush=True)
        runs_file.write_text(json.dumps(runs, indent=1))
    models = {r["kind"]: final_model(r["dir"], args.device) for r in runs}
    for r in runs:
        r["parameters"] = sum(p.numel() for p in models[r["kind"]].parameters())
    lengths = [args.seq_len * m for m in (1, 2, 4)]
    buckets = sorted({0, args.seq_len // 2, args.seq_len, 2 * args.seq_len, 3 * args.seq_len})
    result = {"args": vars(args), "lengths": lengths, "runs": runs, "position_ppl": {}, "longctx": [],
              "kv_bytes_per_token": {}, "decode_tokens_per_s": {}}
    for kind, m in models.items():
        result["position_ppl"][kind] = {str(n): position_perplexity(m, data.val, n, args.ppl_windows, buckets,
                                                                    progress=False) for n in lengths}
        for row in evaluate_longctx(m, data.tokenizer, list(TASKS), lengths, args.tasks_n, seed=args.seed,
                                    progress=False):
            result["longctx"].append({"kind": kind, **row})
        result["kv_bytes_per_token"][kind] = {str(n): cache_bytes(m.config, n, 2) / n for n in lengths + [131072]}
        print(f"evaluated {kind}", flush=True)
    prompt = torch.from_numpy(data.val[: 2 * args.seq_len].astype("int64"))[None].to(args.device)
    result["decode_tokens_per_s"] = decode_speed(models, prompt, 64, args.decode_repeats)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, RESULTS / f"{args.tag}.png")
    print(summary_table(result))


def summary_table(result: dict) -> str:
    lengths = result["lengths"]
    lines = ["| model | params | val ppl @train | " + " | ".join(f"ppl last bucket @{n}" for n in lengths)
             + " | " + " | ".join(f"long-ctx EM @{n}" for n in lengths) + " | " + " | ".join(
                 f"answer logp @{n}" for n in lengths) + " | KV B/token @128k | decode tok/s |",
             "|---" * (5 + 3 * len(lengths)) + "|"]
    for r in result["runs"]:
        k = r["kind"]
        ppl = [result["position_ppl"][k][str(n)][-1]["ppl"] for n in lengths]
        em = [statistics.mean(x["exact_match"] for x in result["longctx"] if x["kind"] == k and x["length"] == n)
              for n in lengths]
        lp = [statistics.mean(x["answer_logprob_per_token"] for x in result["longctx"]
                              if x["kind"] == k and x["length"] == n) for n in lengths]
        lines.append(f"| {k} | {r['parameters']:,} | {r['val_ppl']:.2f} | " + " | ".join(f"{p:.1f}" for p in ppl)
                     + " | " + " | ".join(f"{e:.3f}" for e in em) + " | " + " | ".join(f"{x:.2f}" for x in lp)
                     + f" | {result['kv_bytes_per_token'][k]['131072']:,.0f} | "
                     f"{result['decode_tokens_per_s'][k]:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
