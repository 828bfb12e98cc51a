"""Training throughput of leanlm against transformers' LlamaForCausalLM with the same shapes and weights.

Both models get identical weights (leanlm uses Llama's parameter names), are checked to give the same logits, and
are then timed side by side in one process: rounds alternate between the two so machine noise hits both alike.
A step is forward + backward + AdamW on one batch of random tokens. Reported: median tokens/s of each and their
ratio; on CUDA also MFU (6 * params * tokens + attention FLOPs, against the GPU's bf16 peak).

    python benchmarks/train_throughput.py                       # `small` config on this CPU
    python benchmarks/train_throughput.py --config 125m --device cuda --batch-size 16 --seq-len 1024

Writes docs/results/training-<config>-<device>.json and a bar chart PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from leanlm import LeanLMForCausalLM
from leanlm.interop import to_llama
from leanlm.runconfig import load_run_config

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def make_step(model, batch, autocast_dtype):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=batch.is_cuda or None)
    inputs, targets = batch[:, :-1], batch[:, 1:]

    def step() -> None:
        with torch.autocast(batch.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            logits = model(input_ids=inputs, use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def timed(step, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps-per-round", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS), help="folder for the JSON and PNG (default docs/results)")
    args = ap.parse_args()
    results = Path(args.out)

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = LeanLMForCausalLM(load_run_config(args.config).model_config())
    twin = to_llama(model)
    x = torch.randint(0, model.config.vocab_size, (2, 64))
    with torch.no_grad():
        diff = (model(x).logits - twin(x).logits).abs().max().item()
    print(f"max |logit difference| leanlm vs LlamaForCausalLM with the same weights: {diff:.2e}")
    model, twin = model.to(device).train(), twin.to(device).train()
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    autocast = torch.bfloat16 if bf16 else None
    batch = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len + 1), device=device)
    steps = {"leanlm": make_step(model, batch, autocast), "transformers Llama": make_step(twin, batch, autocast)}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(args.rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        for name in order:
            for _ in range(args.steps_per_round):
                times[name].append(timed(steps[name], device))
    tokens = args.batch_size * args.seq_len
    n_params = sum(p.numel() for p in model.parameters())
    c = model.config
    flops_per_token = 6 * n_params + 6 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * args.seq_len
    result = {"config": args.config, "device": torch.cuda.get_device_name() if device.type == "cuda" else
              f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
              "torch": torch.__version__, "batch_size": args.batch_size, "seq_len": args.seq_len,
              "params": n_params, "dtype": "bf16 autocast" if bf16 else "fp32", "logit_max_abs_diff": diff,
              "steps_timed_each": len(times["leanlm"]), "models": {}}
    for name, ts in times.items():
        med = statistics.median(ts)
        entry = {"median_step_s": med, "tokens_per_s": tokens / med,
                 "iqr_s": [statistics.quantiles(ts, n=4)[0], statistics.quantiles(ts, n=4)[2]]}
        if device.type == "cuda":
            peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in result["device"]), None)
            if peak:
                entry["mfu"] = flops_per_token * tokens / med / (peak * 1e12)
        result["models"][name] = entry
    result["ratio_leanlm_over_llama"] = (result["models"]["leanlm"]["tokens_per_s"]
                                         / result["models"]["transformers Llama"]["tokens_per_s"])
    print(json.dumps(result, indent=1))
    results.mkdir(parents=True, exist_ok=True)
    stem = f"training-{args.config}-{device.type}"
    (results / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
    names = list(result["models"])
    vals = [result["models"][n]["tokens_per_s"] for n in names]
    ax.bar(names, vals, color=["tab:blue", "tab:gray"])
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom")
    ax.set_ylabel("training tokens/s (median)")
    ax.set_title(f"{args.config}, B={args.batch_size} T={args.seq_len}, {result['device']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(results / f"{stem}.png")
    print(f"wrote {results / stem}.json/.png; leanlm / Llama = {result['ratio_leanlm_over_llama']:.3f}")


if __name__ == "__main__":
    main()
