"""Decoding speed on this machine: Hugging Face `generate` against leanlm's backend, plain and speculative, eager
and compiled, on MT-bench's first turns (chat template, greedy, fp32), everything interleaved per prompt.

    python benchmarks/decode_speed.py                       # all 80 prompts, 128 new tokens (resumes)
    python benchmarks/decode_speed.py --limit 4 --max-new-tokens 32 --methods hf_eager,leanlm_plain_eager

Methods (each one per prompt, in this order, so machine noise hits all alike):
  hf_eager              model.generate(do_sample=False), transformers' dynamic cache
  hf_static_compiled    HF's static-cache + torch.compile recipe (cache_implementation="static", the forward
                        compiled); reported as failed if it does not run on this machine
  hf_prompt_lookup      model.generate(prompt_lookup_num_tokens=10)
  leanlm_plain_eager / leanlm_plain_compiled          leanlm's backend without a draft
  leanlm_{chain,eagle2,c2t}_{eager,compiled}          speculative decoding with the committed SmolLM2 head
                                                      (or --draft / --classifier)
Each row: wall seconds including prefill (compile time excluded and reported apart), new tokens, and whether the
tokens equal hf_eager's. Rows are appended to `<out>.jsonl` as they finish, so an interrupted run resumes where it
stopped (rerun the same command); `--report` writes the table (`<out>.md`), the JSON summary and the plot from what
is there. On its first start the run also measures the target's step cost at tree widths 1-16, eager and compiled
(`meta.step_ms` in `<out>.json`); `--step-costs` measures widths 1-64 in a process of its own.
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

ALL = ["hf_eager", "hf_static_compiled", "hf_prompt_lookup", "leanlm_plain_eager", "leanlm_plain_compiled",
       "leanlm_chain_eager", "leanlm_chain_compiled", "leanlm_eagle2_eager", "leanlm_eagle2_compiled",
       "leanlm_c2t_eager", "leanlm_c2t_compiled"]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=int, default=80)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--methods", default=",".join(ALL))
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: one core, as the profile in the issue)")
    p.add_argument("--chain", default="chain:length=4")
    p.add_argument("--eagle2", default="eagle2:total_tokens=16:depth=5:top_k=4",
                   help="EAGLE-2 tree for this CPU (the default 60-node tree costs more than it saves here)")
    p.add_argument("--c2t", default="c2t:beta=0.5:max_nodes=16")
    p.add_argument("--size-from", default=None,
                   help="trees from `leanlm spec c2t-collect`: replace --eagle2 and --c2t by the sizes the cost model "
                        "picks from this machine's measured (eager) step costs (`spec bench --size-from`); a resumed "
                        "run reuses the first start's sizes")
    p.add_argument("--draft", default=None, help="draft head folder (default: the committed SmolLM2 head)")
    p.add_argument("--classifier", default=None, help="C2T classifier folder (default: the committed one)")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "decoding-mtbench"))
    p.add_argument("--report", action="store_true", help="only write the table/plot from the rows so far")
    p.add_argument("--step-costs", action="store_true",
                   help="instead: median seconds of one target step over n = 1..64 tree tokens after 256 cached "
                        "ones, eager and compiled, interleaved (into <out>-steps.json / .md / .png)")
    return p.parse_args()


def report(out: Path, meta: dict | None = None) -> None:
    rows = [json.loads(x) for x in out.with_suffix(".jsonl").read_text().splitlines() if x.strip()]
    by = {}
    for r in rows:
        by.setdefault(r["method"], []).append(r)
    prompts = sorted({r["prompt"] for r in rows if r["method"] == "hf_eager"})
    ref = {r["prompt"]: r for r in by.get("hf_eager", [])}
    table = []
    for m in [m for m in ALL if m in by]:
        mine = {r["prompt"]: r for r in by[m]}
        common = [p for p in prompts if p in mine and "seconds" in mine[p]]
        if not common:
            table.append({"method": m, "prompts": 0, "error": next((r.get("error") for r in by[m]), None)})
            continue
        ratios = [ref[p]["seconds"] / mine[p]["seconds"] for p in common]
        tps = [mine[p]["new_tokens"] / mine[p]["seconds"] for p in common]
        row = {"method": m, "prompts": len(common), "median_seconds": statistics.median(
            mine[p]["seconds"] for p in common), "median_tokens_per_s": statistics.median(tps),
               "median_ratio_vs_hf_eager": statistics.median(ratios),
               "identical_to_hf_eager": sum(mine[p]["tokens"] == ref[p]["tokens"] for p in common),
               "compile_seconds": max((mine[p].get("compile_seconds", 0.0) for p in common), default=0.0)}
        for k in ("tau_plus_bonus", "candidates_per_step", "overhead_fraction"):
            vals = [mine[p][k] for p in common if k in mine[p]]
            if vals:
                row[k] = statistics.median(vals)
        table.append(row)
    lines = ["| method | prompts | median s | tokens/s | ratio vs HF eager (median) | identical to HF | τ+1 | "
             "nodes/step | overhead | compile s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        if not r["prompts"]:
            lines.append(f"| {r['method']} | 0 | failed: {r.get('error')} | | | | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['prompts']} | {r['median_seconds']:.2f} | "
                     f"{r['median_tokens_per_s']:.1f} | {r['median_ratio_vs_hf_eager']:.2f}x | "
                     f"{r['identical_to_hf_eager']}/{r['prompts']} | {r.get('tau_plus_bonus', 1.0):.2f} | "
                     f"{r.get('candidates_per_step', 1.0):.1f} | "
                     f"{100 * r['overhead_fraction']:.1f}% | {r['compile_seconds']:.0f} |"
                     if "overhead_fraction" in r else
                     f"| {r['method']} | {r['prompts']} | {r['median_seconds']:.2f} | "
                     f"{r['median_tokens_per_s']:.1f} | {r['median_ratio_vs_hf_eager']:.2f}x | "
                     f"{r['identical_to_hf_eager']}/{r['prompts']} | | | | {r['compile_seconds']:.0f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    old = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta or old.get("meta"), "table": table}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in table if r["prompts"]]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.barh([r["method"] for r in done], [r["median_ratio_vs_hf_eager"] for r in done], color="tab:blue")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("speed vs HF generate eager (median of per-prompt ratios)")
    ax.set_title(f"SmolLM2-135M-Instruct, MT-bench first turns ({done[0]['prompts'] if done else 0} prompts)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print("\n".join(lines))


def measure_steps(targets: dict, widths, rounds: int = 5) -> dict:
    """Median ms of one SmolLM2 target step over n tree tokens after 256 cached ones, for each named target (eager
    and compiled; fp32 and bf16 in verify_dtype.py), round-robin so noise hits all alike (the tree shape of
    `cost.verify_seconds`). Returns {name: {n: ms}}."""
    import statistics as st

    from leanlm.speculative.cost import verify_seconds

    runs = {name: {n: [] for n in widths} for name in targets}
    for _ in range(rounds):
        for name, tgt in targets.items():
            for n, sec in verify_seconds(tgt, list(widths), context=256, repeats=3).items():
                runs[name][n].append(1000 * sec)
    return {name: {n: st.median(v) for n, v in r.items()} for name, r in runs.items()}


def plot_steps(path: Path, widths, series: dict, ylabel: str, title: str) -> None:
    """A line per named series ({name: {n: value}}) over tree widths on a log2 axis, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in series.items():
        ax.plot(list(widths), [values[n] for n in widths], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tree tokens verified in one step (after 256 cached)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def step_costs(args, out: Path) -> int:
    """Eager and compiled step costs of SmolLM2 at tree widths 1..64 (the same tree shape as `cost.verify_seconds`),
    measured round-robin so that noise hits both alike."""
    import os

    os.environ.setdefault("LEANLM_CACHE", str(ROOT / ".cache"))
    import torch

    torch.set_num_threads(args.threads)
    from leanlm.inference import load_model_and_tokenizer
    from leanlm.speculative.cost import verify_seconds
    from leanlm.speculative.target import BUCKETS, make_target

    model, _ = load_model_and_tokenizer("smollm2")
    targets = {"eager": make_target(model), "compiled": make_target(model, compile=True)}
    t = time.perf_counter()
    verify_seconds(targets["compiled"], list(BUCKETS), context=256, repeats=1)  # compiles every width once
    compile_s = time.perf_counter() - t
    ms = measure_steps(targets, BUCKETS)
    one = ms["compiled"][1]
    result = {"threads": args.threads, "context": 256, "compile_seconds_all_widths": compile_s, "ms": ms,
              "ratio_to_compiled_1_token": {k: {n: v / one for n, v in r.items()} for k, r in ms.items()}}
    path = Path(str(out) + "-steps")
    path.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = ["| tree tokens n | eager ms | compiled ms | eager / compiled 1-token | compiled / compiled 1-token |",
             "|---|---|---|---|---|"]
    for n in BUCKETS:
        lines.append(f"| {n} | {ms['eager'][n]:.1f} | {ms['compiled'][n]:.1f} | {ms['eager'][n] / one:.2f}x | "
                     f"{ms['compiled'][n] / one:.2f}x |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot_steps(path.with_suffix(".png"), BUCKETS, ms, "ms (median)", "SmolLM2-135M target step, this CPU")
    print("\n".join(lines))
    print(f"compile: {compile_s:.0f} s for {len(BUCKETS)} widths")
    return 0


def main() -> int:
    args = parse()
    out = Path(args.out)
    if args.report:
        report(out)
        return 0
    if args.step_costs:
        return step_costs(args, out)
    import os

    os.environ.setdefault("LEANLM_CACHE", str(ROOT / ".cache"))
    import torch
    from tqdm.auto import tqdm

    torch.set_num_threads(args.threads)
    from leanlm.inference import load_model_and_tokenizer
    from leanlm.pretrained import committed_draft
    from leanlm.speculative.draft import EagleDraftHead
    from leanlm.speculative.engine import SpeculativeDecoder, cache_capacity
    from leanlm.speculative.prompts import encode_chat, load_prompts
    from leanlm.speculative.target import BUCKETS, make_target
    from leanlm.speculative.strategies import parse_strategy

    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in ALL]
    if bad:
        print(f"error: unknown methods {bad}; use some of {ALL}", file=sys.stderr)
        return 2
    model, tok = load_model_and_tokenizer("smollm2")
    committed = committed_draft("smollm2") or (None, None)
    head_dir, clf_dir = Path(args.draft or committed[0]), Path(args.classifier or committed[1])
    head, _ = EagleDraftHead.load(head_dir, model.config)
    strategies = {"chain": parse_strategy(args.chain), "eagle2": parse_strategy(args.eagle2),
                  "c2t": parse_strategy(args.c2t, classifier=str(clf_dir))}
    prompts = [encode_chat(tok, p) for p in load_prompts("mtbench", args.limit)]
    eos = tok.eos_token_id
    capacity = cache_capacity(max(len(p) for p in prompts), args.max_new_tokens, max(BUCKETS))
    eager, compiled = make_target(model, compile=False), None
    meta = {"threads": args.threads, "draft": str(head_dir), "classifier": str(clf_dir),
            "max_new_tokens": args.max_new_tokens, "capacity": capacity,
            "strategies": {k: v.describe() for k, v in strategies.items()}, "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "compile_warmup_seconds": {}}
    rows_path = out.with_suffix(".jsonl")
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    warmups = meta["compile_warmup_seconds"]  # this start's compile warm-ups
    if rows_path.exists() and out.with_suffix(".json").exists():  # a resumed run keeps the first start's meta
        first = json.loads(out.with_suffix(".json").read_text()).get("meta") or {}
        if first:
            first.setdefault("resumed_warmups", []).append(warmups)
            meta = first
    if args.size_from:  # trees sized to this machine, once per run (a resumed run keeps the first start's sizes)
        from leanlm.speculative.bench import sized_strategies, strategies_for_sizes
        from leanlm.speculative.c2t import C2TClassifier
        from leanlm.speculative.c2t_train import load_rows

        clf = C2TClassifier.load(clf_dir)[0]
        if "sizes" not in meta:
            _, meta["sizes"] = sized_strategies(eager, head, load_rows(args.size_from)[0], clf)
        auto = strategies_for_sizes(meta["sizes"], clf)
        strategies["eagle2"], strategies["c2t"] = auto["eagle2:auto"], auto["c2t:auto"]
        meta["strategies"] = {k: v.describe() for k, v in strategies.items()}
        print(f"sized for this machine: {meta['strategies']}", flush=True)
    done = set()
    if rows_path.exists():
        for line in rows_path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done.add((r["prompt"], r["method"]))
    if any(m.endswith("_compiled") and m.startswith("leanlm") for m in methods):
        compiled = make_target(model, compile=True)
        compiled.start(1, capacity)
        t = time.perf_counter()
        compiled.warmup(BUCKETS[:5])  # 1..16: the widths these trees use; wider steps compile when first seen
        warmups["leanlm"] = time.perf_counter() - t
        print(f"leanlm compile warm-up: {warmups['leanlm']:.0f} s "
              f"({compiled.compile_stats.seconds})", flush=True)
        if not rows_path.exists():  # first start: the step costs with the graphs just compiled
            meta["step_ms"] = measure_steps({"eager": eager, "compiled": compiled}, BUCKETS[:5])
            print(f"step ms: {meta['step_ms']}", flush=True)
    hf_static = None
    if "hf_static_compiled" in methods:
        from transformers import AutoModelForCausalLM
        from leanlm.pretrained import smollm2_135m_instruct

        try:
            hf_static = AutoModelForCausalLM.from_pretrained(str(smollm2_135m_instruct()), local_files_only=True).eval()
            hf_static.generation_config.cache_implementation = "static"
            hf_static.forward = torch.compile(hf_static.forward)  # the documented recipe (mode: default on CPU)
            t = time.perf_counter()
            with torch.no_grad():  # two prompt lengths: dynamo then makes the prefill graph length-dynamic
                for p in (prompts[0], prompts[0][:-1]):
                    hf_static.generate(torch.tensor([p]), max_new_tokens=4, do_sample=False, eos_token_id=eos,
                                       pad_token_id=eos)
            warmups["hf_static"] = time.perf_counter() - t
        except Exception as exc:  # noqa: BLE001 - recorded as this method's result
            hf_static = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"

    def dynamo_seconds() -> float:
        """Seconds dynamo (with inductor inside) has spent compiling in this process so far."""
        from torch._dynamo.utils import compilation_time_metrics

        return sum(compilation_time_metrics.get("_compile.compile_inner", []))

    def run(method: str, ids: list[int]) -> dict:
        x = torch.tensor([ids])
        n = args.max_new_tokens
        with torch.no_grad():
            if method.startswith("hf_"):
                if method == "hf_static_compiled" and isinstance(hf_static, str):
                    return {"error": hf_static}
                m = hf_static if method == "hf_static_compiled" else model
                kw = {"prompt_lookup_num_tokens": 10} if method == "hf_prompt_lookup" else {}
                c0 = dynamo_seconds()
                t = time.perf_counter()
                y = m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                               eos_token_id=eos, pad_token_id=eos, **kw)
                sec = time.perf_counter() - t
                comp = dynamo_seconds() - c0  # recompiles (a new prompt-length bucket), reported apart
                new = y[0, x.shape[1]:].tolist()
                return {"seconds": sec - comp, "tokens": new, "new_tokens": len(new), "compile_seconds": comp}
            _, kind, mode = method.split("_")
            tgt = compiled if mode == "compiled" else eager
            strategy = None if kind == "plain" else strategies[kind]
            dec = SpeculativeDecoder(tgt, head if strategy else None, strategy,
                                     capacity=capacity if mode == "compiled" else None)  # eager: sized per prompt
            c0 = tgt.compile_stats.total_seconds()
            t = time.perf_counter()
            new, st = dec.generate(x, n, eos_token_id=eos)
            sec = time.perf_counter() - t
            comp = tgt.compile_stats.total_seconds() - c0
            row = {"seconds": sec - comp, "tokens": new, "new_tokens": len(new), "compile_seconds": comp}
            if strategy is not None:
                d = st.as_dict()
                row |= {k: d[k] for k in ("tau_plus_bonus", "candidates_per_step", "overhead_fraction",
                                          "draft_ms_per_step", "verify_ms_per_step")}
            else:
                d = st.as_dict()
                row["overhead_fraction"] = d["overhead_fraction"]
            return row

    with rows_path.open("a") as f:
        for i, ids in enumerate(tqdm(prompts, desc="prompts")):
            for m in methods:
                if (i, m) in done:
                    continue
                row = {"prompt": i, "method": m, "prompt_tokens": len(ids)} | run(m, ids)
                f.write(json.dumps(row) + "\n")
                f.flush()
            report(out, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
