"""Triton kernels on a GPU: ASA / NSA layer training speed against full attention and fla's NSA, and decode latency
against the memory-bandwidth floor. Everything is measured side by side in one run (medians of CUDA-event timings).

    python benchmarks/kernels.py                    # GPU (H100/H200): bf16, T = 8k..64k, decode at 32k..128k
    python benchmarks/kernels.py --smoke            # CPU: tiny shapes through the Triton interpreter (script check)

Layers (B = 1, bf16, forward + backward, projections included): the proposed ASA-340M layer shapes of docs/asa.md
(hidden 1024, 16 heads, head_dim 64; local = MLA d_c 256 / d_r 32 with a 512-token window; global = GLA 4 latent
heads of 128 + d_r 32, 16-token blocks, top-16, 4-token query groups), an NSA layer (GQA 16/4 heads, the NSA paper's
l/d/l' = 32/16/64, top-16, window 512) and the full-attention GQA layer through
`F.scaled_dot_product_attention` with only the FlashAttention backend allowed. "ASA" is the mean of one local and
one global layer (ASA alternates them). fla's `parallel_nsa` is compared as an op with our NSA op at a shape it
accepts (64 query / 4 KV heads, head_dim 128 (fla needs >= 16 heads per group), block 64, top-16, window 512).

Decode (one token, B = 1 and 8): MLA (one latent head, d_c 256 + d_r 32), GLA (4 x 128 + 32) over the whole cache,
and ASA's global step (compressed-cache attention + on-device top-n + selection over 16 blocks). The floor is the
bytes the step must read divided by the copy bandwidth measured on the same GPU in the same run.

Writes docs/results/kernels.json, kernels-tables.md and kernels.png (or --out DIR).
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

LAYER = dict(vocab_size=256, hidden_size=1024, num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=4,
             head_dim=64, kv_lora_rank=256, qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64,
             gla_latent_heads=4, gla_kv_lora_rank=512, nsa_select_count=16, nsa_window=512)
# --smoke: the same layer kinds, narrower (4 heads, 1 KV / latent head), so the interpreter finishes quickly.
SMOKE_LAYER = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=1, kv_lora_rank=64, gla_latent_heads=1,
                   gla_kv_lora_rank=128, nsa_select_count=4, nsa_window=64)
ASA = dict(attention="asa", nsa_compress_block=16, nsa_compress_stride=16, nsa_select_block=16, nsa_query_group=4)
NSA = dict(attention="nsa", nsa_compress_block=32, nsa_compress_stride=16, nsa_select_block=64, nsa_query_group=1)


def timer(device, default_warmup: int = 2):
    """Median milliseconds of fn() over reps (CUDA events on GPU, wall clock on CPU)."""
    import torch

    def run(fn, reps: int, warmup: int | None = None) -> float:
        warmup = default_warmup if warmup is None else warmup
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    return run


def make_layer(fields: dict, layer_idx: int, device, dtype):
    import torch

    from leanlm.attention import ATTENTION_CLASSES
    from leanlm.config import LeanLMConfig

    cfg = LeanLMConfig(**{**LAYER, **fields, "max_position_embeddings": fields.get("max_position_embeddings", 1 << 17),
                          "attention_kernels": "triton"})
    torch.manual_seed(0)
    kind = cfg.layer_attention[layer_idx]
    return ATTENTION_CLASSES[kind](cfg, layer_idx).to(device, dtype)


def layer_step(layer, t: int, device, dtype, flash_only: bool):
    """A closure running forward + backward of `layer` on a fresh [1, T, C] input."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from leanlm.rope import Positions

    x = torch.randn(1, t, layer.config.hidden_size, device=device, dtype=dtype, requires_grad=True)
    pos = Positions(torch.arange(t, device=device)[None])
    grad = torch.randn_like(x)

    def step():
        if flash_only:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                out = layer(x, pos, None, None)
        else:
            out = layer(x, pos, None, None)
        out.backward(grad)

    return step


def bench_layers(args, device, dtype, run) -> list[dict]:
    import torch

    rows = []
    impls = {
        "full (SDPA flash)": (dict(attention="gqa"), 0, device.type == "cuda"),
        "ASA local (MLA window)": (ASA, 0, False),
        "ASA global (GLA cmp+slc)": (ASA, 1, False),
        "NSA": (NSA, 0, False),
    }
    for t in args.lengths:
        row = {"T": t}
        for name, (fields, idx, flash) in impls.items():
            try:
                layer = make_layer(fields, idx, device, dtype)
                row[name] = run(layer_step(layer, t, device, dtype, flash), args.reps)
            except Exception as e:  # noqa: BLE001 - record why (e.g. out of memory) and go on
                row[name] = None
                row[name + " error"] = f"{type(e).__name__}: {str(e)[:160]}"
            del layer
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if row.get("ASA local (MLA window)") and row.get("ASA global (GLA cmp+slc)"):
            row["ASA"] = (row["ASA local (MLA window)"] + row["ASA global (GLA cmp+slc)"]) / 2
        row.update(bench_nsa_ops(args, t, device, dtype, run))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def bench_nsa_ops(args, t: int, device, dtype, run) -> dict:
    """Our NSA op (compression + top-n + selection + window kernels) against fla's parallel_nsa, same shape."""
    import torch

    from leanlm.attention import sparse as ref
    from leanlm.kernels import banded, selection, topk

    h, g, d, blk, n, w = (64, 4, 128, 64, 16, 512) if not args.smoke else (16, 1, 32, 16, 2, 32)
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, h, t, d, device=device, dtype=dtype, generator=gen).requires_grad_()
    k = torch.randn(1, g, t, d, device=device, dtype=dtype, generator=gen).requires_grad_()
    v = torch.randn(1, g, t, d, device=device, dtype=dtype, generator=gen).requires_grad_()
    scale = d ** -0.5
    pos = torch.arange(t, device=device)

    def ours():
        kc, vc = ref.compress(k, blk, blk), ref.compress(v, blk, blk)
        o_cmp, lse = banded.compression_attention(q, kc, vc, 0, blk, blk, scale)
        idx = topk.select_blocks(q.detach(), kc.detach(), lse, pos, n, blk, blk, blk, 1, 2, scale)
        o = o_cmp + selection.selection_attention(q, k, v, idx, 0, 0, blk, scale) \
            + banded.window_attention(q, k, v, 0, 0, w, scale)
        o.backward(torch.ones_like(o))

    out = {"NSA op (ours)": run(ours, args.reps)}
    try:
        from fla.ops.nsa import parallel_nsa  # noqa: F401 - optional, GPU only
    except Exception as e:  # noqa: BLE001
        out["NSA op (fla)"] = None
        out["NSA op (fla) error"] = f"fla not importable: {type(e).__name__}"
        return out
    qf, kf, vf = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))  # [B, T, H, D]
    gates = [torch.ones(1, t, h, device=device, dtype=dtype) for _ in range(3)]

    def fla():
        o = parallel_nsa(qf, kf, vf, *gates, block_counts=n, block_size=blk, window_size=w, scale=scale)
        o.backward(torch.ones_like(o))

    try:
        out["NSA op (fla)"] = run(fla, args.reps)
    except Exception as e:  # noqa: BLE001 - fla's API moves; keep the rest of the run
        out["NSA op (fla)"] = None
        out["NSA op (fla) error"] = f"{type(e).__name__}: {str(e)[:160]}"
    return out


def copy_bandwidth(device, run) -> float:
    """Bytes/s of a device-to-device copy of 1 GiB (read + write counted)."""
    import torch

    n = (1 << 30) if device.type == "cuda" else (1 << 24)
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = run(lambda: b.copy_(a), 10)
    return 2 * n / (ms / 1e3)


def bench_decode(args, device, dtype, run, bandwidth: float) -> list[dict]:
    import torch

    from leanlm.kernels import decode, topk

    rows = []
    esize = torch.tensor([], dtype=dtype).element_size()
    for ctx in args.decode_lengths:
        for b in args.decode_batch:
            row = {"context": ctx, "B": b}
            gen = torch.Generator(device=device).manual_seed(0)

            def rnd(*shape):
                return torch.randn(*shape, device=device, dtype=dtype, generator=gen)

            # MLA: one latent head, 16 query heads
            c, kr = rnd(b, 1, ctx, 256), rnd(b, 1, ctx, 32)
            ql, qr = rnd(b, 16, 256), rnd(b, 16, 32)
            row["MLA"] = run(lambda: decode.latent_decode(ql, qr, c, kr, 0.1), args.reps)
            row["MLA floor"] = b * ctx * (256 + 32) * esize / bandwidth * 1e3
            del c, kr
            # GLA: 4 latent heads of 128, 4 query heads each
            c, kr = rnd(b, 4, ctx, 128), rnd(b, 1, ctx, 32)
            ql, qr = rnd(b, 16, 128), rnd(b, 16, 32)
            row["GLA"] = run(lambda: decode.latent_decode(ql, qr, c, kr, 0.1), args.reps)
            row["GLA floor"] = b * ctx * (4 * 128 + 32) * esize / bandwidth * 1e3
            # ASA global step: compressed cache (16-token blocks) + top-16 + selection over the GLA cache
            m = ctx // 16
            kc = rnd(b, 4, m, 160)
            qbar = torch.cat([ql, qr], -1)[:, :, None]
            pos = torch.tensor([ctx - 1], device=device)

            def asa_step():
                o, lse = decode.latent_decode(ql, qr, kc[..., :128], kc[..., 128:], 0.1)
                idx = topk.select_blocks(qbar, kc, lse[:, :, None], pos, 16, 16, 16, 16, 1, 2, 0.1)
                decode.latent_decode(ql, qr, c, kr, 0.1, blocks=idx[:, :, 0], block=16)

            row["ASA global"] = run(asa_step, args.reps)
            # bytes: the compressed cache read twice (attention, top-n) + 16 blocks of latents per group
            row["ASA global floor"] = b * (2 * m * 4 * 160 + 16 * 16 * (4 * 128 + 32)) * esize / bandwidth * 1e3
            del c, kr, kc
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def tables(result: dict) -> str:
    lines = [f"Device: {result['device']}; dtype {result['dtype']}; medians of {result['reps']} runs; "
             f"copy bandwidth {result['bandwidth_GBps']:.0f} GB/s.", "",
             "### Forward + backward per layer (ms, B = 1)", ""]
    names = ["full (SDPA flash)", "ASA local (MLA window)", "ASA global (GLA cmp+slc)", "ASA", "NSA",
             "NSA op (ours)", "NSA op (fla)"]
    lines.append("| T | " + " | ".join(names) + " | full / ASA | fla / ours |")
    lines.append("|" + "---|" * (len(names) + 3))

    def f(x):
        return "—" if x is None else f"{x:.2f}"

    for r in result["layers"]:
        ratio = f(r["full (SDPA flash)"] / r["ASA"]) if r.get("ASA") and r.get("full (SDPA flash)") else "—"
        fla = f(r["NSA op (fla)"] / r["NSA op (ours)"]) if r.get("NSA op (fla)") and r.get("NSA op (ours)") else "—"
        lines.append(f"| {r['T']} | " + " | ".join(f(r.get(n)) for n in names) + f" | {ratio} | {fla} |")
    lines += ["", "### Decode, one token (ms) against the bandwidth floor", "",
              "| context | B | MLA | floor | ×floor | GLA | floor | ×floor | ASA global | floor | ×floor |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["decode"]:
        cells = []
        for n in ("MLA", "GLA", "ASA global"):
            cells += [f(r[n]), f"{r[n + ' floor']:.3f}", f"{r[n] / r[n + ' floor']:.2f}"]
        lines.append(f"| {r['context']} | {r['B']} | " + " | ".join(cells) + " |")
    errors = [f"- T={r['T']} {k}: {v}" for r in result["layers"] for k, v in r.items() if k.endswith("error")]
    if errors:
        lines += ["", "Not measured:", *errors]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    ts = [r["T"] for r in result["layers"]]
    for name in ("full (SDPA flash)", "ASA", "NSA", "NSA op (ours)", "NSA op (fla)"):
        ys = [r.get(name) for r in result["layers"]]
        if any(y is not None for y in ys):
            a.plot([t for t, y in zip(ts, ys) if y is not None], [y for y in ys if y is not None], "o-", label=name)
    a.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="forward + backward (ms)",
          title="Training step per layer")
    a.legend(fontsize=8)
    for name in ("MLA", "GLA", "ASA global"):
        rs = [r for r in result["decode"] if r["B"] == result["decode"][0]["B"]]
        line, = b.plot([r["context"] for r in rs], [r[name] for r in rs], "o-", label=name)
        b.plot([r["context"] for r in rs], [r[name + " floor"] for r in rs], "--", color=line.get_color(),
               label=name + " floor")
    b.set(xscale="log", yscale="log", xlabel="context", ylabel="ms per token",
          title=f"Decode, B = {result['decode'][0]['B']}")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="8192,16384,32768,65536")
    p.add_argument("--decode-lengths", default="32768,65536,131072")
    p.add_argument("--decode-batch", default="1,8")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU through the Triton interpreter")
    p.add_argument("--out", default=str(ROOT / "docs" / "results"))
    args = p.parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.lengths, args.decode_lengths, args.decode_batch, args.reps = "64", "256", "1", 1
        LAYER.update(SMOKE_LAYER)  # the interpreter runs every program in Python: narrow layers keep it to a minute
    import torch

    args.lengths = [int(x) for x in str(args.lengths).split(",")]
    args.decode_lengths = [int(x) for x in str(args.decode_lengths).split(",")]
    args.decode_batch = [int(x) for x in str(args.decode_batch).split(",")]
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type != "cuda" and not args.smoke:
        print("benchmarks/kernels.py measures GPU kernels: run it on a CUDA machine, or pass --smoke to check the "
              "script on CPU", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    run = timer(device, default_warmup=0 if args.smoke else 2)  # smoke: a script check, timings meaningless
    bandwidth = copy_bandwidth(device, run)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)",
              "dtype": str(dtype), "reps": args.reps, "bandwidth_GBps": bandwidth / 1e9,
              "command": "python benchmarks/kernels.py " + " ".join(sys.argv[1:])}
    result["layers"] = bench_layers(args, device, dtype, run)
    result["decode"] = bench_decode(args, device, dtype, run, bandwidth)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.json").write_text(json.dumps(result, indent=1))
    (out / "kernels-tables.md").write_text(tables(result))
    plot(result, out / "kernels.png")
    print(tables(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
