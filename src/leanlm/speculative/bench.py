"""`leanlm spec bench`: speculative decoding against plain decoding on held-out prompt sets, per strategy.

Prompt sets (`leanlm.speculative.prompts`, never used to train draft heads): `mtbench`, `gsm8k`, `humaneval`. Every prompt
is decoded plainly and with each strategy back to back (interleaved, so machine noise hits all alike), greedy, and the outputs
are checked to be identical. Reported per strategy: τ (accepted draft tokens per step, bonus excluded; τ + 1 is
EAGLE's "accept length"), candidates verified per step, draft and verify milliseconds per step, tokens/s and the
speed-up over plain decoding (ratio of total decode times over the same prompts).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from leanlm.speculative.c2t import C2T
from leanlm.speculative.c2t_train import cost_aware_beta
from leanlm.speculative.cost import cost_aware_eagle2, draft_layer_seconds, step_overhead_seconds, verify_seconds
from leanlm.speculative.engine import SpeculativeDecoder, cache_capacity, plain_generate
from leanlm.speculative.prompts import encode_chat
from leanlm.speculative.target import make_target
from leanlm.speculative.tree import Eagle2, TreeStrategy


def run_bench(model, tokenizer, head, strategies: dict[str, TreeStrategy], prompt_sets: dict[str, list[str]],
              max_new_tokens: int, progress: bool = True,
              answers: dict[str, list[list[int]]] | None = None, compile: bool | str = False) -> list[dict]:
    """One row per prompt set and strategy (plain decoding as strategy "none"); `answers`, when given, receives the
    plain greedy answer (token ids) of every prompt, per set. Plain and speculative decoding share one target
    (`compile`: see `leanlm.speculative.target`) and one cache size, so compiled graphs are made once per width."""
    target = make_target(model, compile)
    widest = max([s.node_bound() or 256 for s in strategies.values()] + [1])
    longest = max(len(encode_chat(tokenizer, p)) for ps in prompt_sets.values() for p in ps)
    capacity = cache_capacity(longest, max_new_tokens, widest)
    rows = []
    for set_name, prompts in prompt_sets.items():
        plain_s, plain_tokens = 0.0, 0
        acc = {k: {"steps": 0, "accepted": 0, "candidates": 0, "draft": 0.0, "verify": 0.0, "seconds": 0.0,
                   "tokens": 0, "identical": 0} for k in strategies}
        for prompt in tqdm(prompts, desc=set_name, disable=not progress, leave=False):
            ids = torch.tensor([encode_chat(tokenizer, prompt)])
            ref, secs = plain_generate(target, ids, max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                       capacity=capacity)
            if answers is not None:
                answers.setdefault(set_name, []).append(ref)
            plain_s += secs
            plain_tokens += len(ref) - 1  # the first token comes from the prompt's forward in both
            for name, strategy in strategies.items():
                out, st = SpeculativeDecoder(target, head, strategy, capacity=capacity).generate(
                    ids, max_new_tokens, eos_token_id=tokenizer.eos_token_id)
                a = acc[name]
                a["identical"] += out == ref
                a["steps"] += st.steps
                a["accepted"] += st.accepted
                a["candidates"] += st.candidates
                a["draft"] += st.draft_seconds
                a["verify"] += st.verify_seconds
                a["seconds"] += st.draft_seconds + st.verify_seconds
                a["tokens"] += len(out) - 1
        rows.append({"prompts": set_name, "strategy": "none", "n": len(prompts), "tokens_per_s": plain_tokens / plain_s,
                     "speedup": 1.0})
        for name, a in acc.items():
            s = max(1, a["steps"])
            rows.append({"prompts": set_name, "strategy": name, "n": len(prompts), "tau": a["accepted"] / s,
                         "candidates_per_step": a["candidates"] / s, "draft_ms_per_step": 1000 * a["draft"] / s,
                         "verify_ms_per_step": 1000 * a["verify"] / s, "tokens_per_s": a["tokens"] / a["seconds"],
                         "speedup": plain_s / a["seconds"] * a["tokens"] / max(1, plain_tokens),
                         "identical_outputs": a["identical"], "describe": strategies[name].describe()})
    return rows


def describe_sizes(chosen: dict) -> str:
    """Two lines on what `sized_strategies` measured and chose: the step costs and sizes, then the predicted tokens/s
    of the best tree against plain decoding (and whether any tree pays)."""
    e2, c2 = chosen["eagle2"], chosen.get("c2t")
    verify = ", ".join(f"{n}: {s * 1000:.1f}" for n, s in chosen["verify_seconds"].items())
    over = chosen.get("overhead_seconds")  # absent from sizes stored before the overhead was modelled
    over = f", step overhead plain {over['plain'] * 1000:.1f} / tree {over['tree'] * 1000:.1f} ms" if over else ""
    line = (f"tree sizes for this machine (draft layer {chosen['draft_layer_seconds'] * 1000:.1f} ms, verify {verify} "
            f"ms{over}): eagle2 total_tokens={e2['total_tokens']} depth={e2['depth']} (replayed tau {e2['tau']:.2f}, "
            f"{e2['nodes']:.1f} nodes)")
    if c2 is not None:
        line += f"; c2t beta={c2['beta']} (replayed tau {c2['tau']:.2f}, {c2['nodes']:.1f} nodes)"
    best = max(e2["tokens_per_second"], c2["tokens_per_second"] if c2 is not None else 0.0)
    plain = chosen["plain_tokens_per_second"]
    return (line + f"\npredicted: best tree {best:.1f} tokens/s, plain decoding {plain:.1f} tokens/s"
            + (" (no tree size pays on this machine with this head)" if best < plain else ""))


def markdown(rows: list[dict]) -> str:
    lines = ["| prompts | strategy | n | τ | τ+1 | candidates/step | draft ms/step | verify ms/step | tok/s | speed-up | identical |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["strategy"] == "none":
            lines.append(f"| {r['prompts']} | none | {r['n']} | | | | | | {r['tokens_per_s']:.1f} | 1.00 | |")
        else:
            lines.append(f"| {r['prompts']} | {r['describe']} | {r['n']} | {r['tau']:.2f} | {r['tau'] + 1:.2f} | "
                         f"{r['candidates_per_step']:.1f} | {r['draft_ms_per_step']:.1f} | "
                         f"{r['verify_ms_per_step']:.1f} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f} | "
                         f"{r['identical_outputs']}/{r['n']} |")
    return "\n".join(lines)


def sized_strategies(model, head, rows: dict[str, torch.Tensor], classifier=None,
                     top_k: int = 10) -> tuple[dict[str, TreeStrategy], dict]:
    """Tree sizes for this machine and backend: measure the target's verification seconds at 1..128 tree tokens
    (`model` may be a compiled `Target`, `make_target(model, compile=True)`: then the compiled steps are measured)
    and the draft's seconds per layer here, and the engine's per-step overhead beyond both, plain and with a tree
    (`leanlm.speculative.cost`), then pick EAGLE-2's total_tokens/depth (`cost_aware_eagle2`) and, with a
    classifier, C2T's beta (`cost_aware_beta`) from the collected trees `rows`.
    Returns the strategies ("eagle2:auto", "c2t:auto") and what was measured and chosen, with the predicted tokens/s
    of each choice beside plain decoding's (`plain_tokens_per_second`): when no size beats it, no tree pays on this
    machine with this head, and the caller should decode plainly."""
    target = make_target(model)  # a compiled `Target` is measured compiled (each size compiles once, at warm-up)
    vs = verify_seconds(target, [1, 2, 4, 8, 16, 32, 64, 128])
    ds = draft_layer_seconds(head, target, width=top_k)
    over = step_overhead_seconds(target, head, vs, ds, top_k=top_k)
    best, _ = cost_aware_eagle2(rows, vs, ds, overhead_seconds=over["tree"])
    chosen = {"verify_seconds": vs, "draft_layer_seconds": ds, "overhead_seconds": over,
              "backend": "compiled" if target.compile_stats.enabled else "eager",
              # the cost model's plain decoding: one 1-token step and the engine's overhead a token
              "plain_tokens_per_second": 1.0 / (vs[1] + over["plain"]),
              "eagle2": {k: best[k] for k in ("total_tokens", "depth", "tau", "nodes", "tokens_per_second")},
              "top_k": top_k}
    if classifier is not None:
        beta, table = cost_aware_beta(classifier, rows, vs, ds, overhead_seconds=over["tree"])
        row = next(r for r in table if r["beta"] == beta)
        chosen["c2t"] = {"beta": beta, "tau": row["tau"], "nodes": row["nodes"],
                         "tokens_per_second": row["tokens_per_second"]}
    return strategies_for_sizes(chosen, classifier), chosen


def strategies_for_sizes(chosen: dict, classifier=None) -> dict[str, TreeStrategy]:
    """The strategies ("eagle2:auto", and "c2t:auto" with a classifier) of sizes `sized_strategies` chose, also
    from a stored copy of `chosen` (a JSON round trip keeps every field this reads)."""
    e2 = chosen["eagle2"]
    out: dict[str, TreeStrategy] = {"eagle2:auto": Eagle2(e2["total_tokens"], e2["depth"], chosen.get("top_k", 10))}
    if classifier is not None and "c2t" in chosen:
        out["c2t:auto"] = C2T(classifier, beta=chosen["c2t"]["beta"])
    return out
