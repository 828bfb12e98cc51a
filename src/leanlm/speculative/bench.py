"""`leanlm spec bench`: speculative decoding against plain decoding on held-out prompt sets, per strategy.

Prompt sets (`leanlm.speculative.prompts`, never used to train draft heads): `mtbench`, `gsm8k`, `humaneval`. Every prompt
is decoded plainly and with each strategy back to back (interleaved, so machine noise hits all alike), greedy, and the outputs
are checked to be identical. Reported per strategy: τ (accepted draft tokens per step, bonus excluded; τ + 1 is
EAGLE's "accept length"), candidates verified per step, draft and verify milliseconds per step, tokens/s and the
speed-up over plain decoding (ratio of total decode times over the same prompts), and τ's 95% interval over prompts
(`tau_interval`).

Each prompt gives one record (`bench_prompt`); `summarize` turns a set's records into table rows. With a
`BenchJournal` the records are appended to disk as prompts finish, so a long run resumes after a stop, and two runs
on the same prompts compare prompt by prompt (`paired_tau_difference`, `benchmarks/compare_runs.py`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from leanlm.checkpoint import sha256_file
from leanlm.errors import LeanLMError
from leanlm.speculative.c2t import C2T
from leanlm.speculative.c2t_train import cost_aware_beta
from leanlm.speculative.cost import cost_aware_eagle2, draft_layer_seconds, step_overhead_seconds, verify_seconds
from leanlm.speculative.engine import SpeculativeDecoder, cache_capacity, plain_generate
from leanlm.speculative.prompts import encode_chat
from leanlm.speculative.target import make_target
from leanlm.speculative.tree import Eagle2, TreeStrategy


def bench_prompt(target, tokenizer, head, strategies: dict[str, TreeStrategy], prompt: str, max_new_tokens: int,
                 capacity: int) -> dict:
    """One prompt decoded plainly, then with each strategy, greedy: a JSON-able record of the plain answer (token
    ids) and seconds, and per strategy its steps, accepted and verified tokens, draft and verify seconds, tokens and
    whether its output equals the plain answer."""
    ids = torch.tensor([encode_chat(tokenizer, prompt)])  # [1, T]
    ref, secs = plain_generate(target, ids, max_new_tokens, eos_token_id=tokenizer.eos_token_id, capacity=capacity)
    record = {"answer": ref, "plain_seconds": secs, "strategies": {}}
    for name, strategy in strategies.items():
        out, st = SpeculativeDecoder(target, head, strategy, capacity=capacity).generate(
            ids, max_new_tokens, eos_token_id=tokenizer.eos_token_id)
        record["strategies"][name] = {"steps": st.steps, "accepted": st.accepted, "candidates": st.candidates,
                                      "draft": st.draft_seconds, "verify": st.verify_seconds, "tokens": len(out) - 1,
                                      "identical": out == ref}
    return record


def summarize(set_name: str, records: list[dict], strategies: dict[str, TreeStrategy]) -> list[dict]:
    """The table rows of one prompt set from its per-prompt records: plain decoding as strategy "none", then one row
    per strategy. The first token comes from the prompt's forward in both, so it is not counted; the speed-up is the
    ratio of total decode seconds over the same prompts, scaled by the tokens each produced."""
    plain_s = sum(r["plain_seconds"] for r in records)
    plain_tokens = sum(len(r["answer"]) - 1 for r in records)
    rows = [{"prompts": set_name, "strategy": "none", "n": len(records), "tokens_per_s": plain_tokens / plain_s,
             "speedup": 1.0}]
    for name, strategy in strategies.items():
        a = {k: sum(r["strategies"][name][k] for r in records)
             for k in ("steps", "accepted", "candidates", "draft", "verify", "tokens", "identical")}
        s, seconds = max(1, a["steps"]), a["draft"] + a["verify"]
        steps = torch.tensor([float(r["strategies"][name]["steps"]) for r in records])  # [P]
        accepted = torch.tensor([float(r["strategies"][name]["accepted"]) for r in records])  # [P]
        rows.append({"prompts": set_name, "strategy": name, "n": len(records), "tau": a["accepted"] / s,
                     "tau_ci95": tau_interval(accepted, steps),
                     "candidates_per_step": a["candidates"] / s, "draft_ms_per_step": 1000 * a["draft"] / s,
                     "verify_ms_per_step": 1000 * a["verify"] / s, "tokens_per_s": a["tokens"] / seconds,
                     "speedup": plain_s / seconds * a["tokens"] / max(1, plain_tokens),
                     "identical_outputs": int(a["identical"]), "describe": strategy.describe()})
    return rows


def resampled_taus(accepted: torch.Tensor, steps: torch.Tensor, resamples: int = 2000, seed: int = 0) -> torch.Tensor:
    """τ (summed accepted tokens over summed steps) of `resamples` bootstrap draws of the prompts: `accepted`,
    `steps` are per-prompt counts [P] or [P, K] (K runs of the same prompts, resampled together); returns [R] or
    [R, K]. Seeded, so a table is reproducible."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(len(steps), (resamples, len(steps)), generator=g)  # [R, P]
    return accepted[pick].sum(1) / steps[pick].sum(1).clamp(min=1)  # [R] or [R, K]


def interval95(samples: torch.Tensor) -> list[float]:
    """The 2.5% and 97.5% quantiles of `samples` [R]."""
    return torch.quantile(samples.double(), torch.tensor([0.025, 0.975], dtype=torch.double)).tolist()


def tau_interval(accepted: torch.Tensor, steps: torch.Tensor, resamples: int = 2000,
                 seed: int = 0) -> list[float]:
    """A 95% bootstrap interval of τ (accepted draft tokens per step, summed over prompts) from per-prompt counts
    `accepted`, `steps` [P]: prompts are resampled with replacement (`resampled_taus`). How far τ moves with the
    choice of prompts: two heads whose intervals overlap on a few dozen prompts are not told apart by that run."""
    if len(steps) < 2:
        t = float(accepted.sum() / steps.sum().clamp(min=1))
        return [t, t]
    return interval95(resampled_taus(accepted, steps, resamples, seed))


def paired_tau_difference(records_a: list[dict], records_b: list[dict], strategy_a: str, strategy_b: str | None = None,
                          resamples: int = 2000, seed: int = 0) -> dict:
    """τ of `strategy_b` in `records_b` minus τ of `strategy_a` in `records_a`, over the prompts both decoded (matched
    by set, index and prompt digest, as `BenchJournal` stores them), with a 95% paired bootstrap interval: the same
    resampled prompts for both sides, so the spread from the choice of prompts that both share cancels (two heads on
    the same questions; one head with two tree shapes). Returns n, tau_a, tau_b, diff and diff_ci95."""
    strategy_b = strategy_b or strategy_a
    key = lambda r: (r["prompts"], r["index"], r["sha"])  # noqa: E731
    b_by = {key(r): r for r in records_b}
    pairs = [(r, b_by[key(r)]) for r in records_a if key(r) in b_by]
    if not pairs:
        raise LeanLMError("the two runs share no prompt. Fix: compare journals of the same --prompts sets")
    counts = lambda k: torch.tensor([[float(a["strategies"][strategy_a][k]), float(b["strategies"][strategy_b][k])]  # noqa: E731
                                     for a, b in pairs])  # [P, 2]
    acc, steps = counts("accepted"), counts("steps")
    tau = acc.sum(0) / steps.sum(0).clamp(min=1)  # [2]
    taus = resampled_taus(acc, steps, resamples, seed)  # [R, 2]
    return {"n": len(pairs), "tau_a": float(tau[0]), "tau_b": float(tau[1]), "diff": float(tau[1] - tau[0]),
            "diff_ci95": interval95(taus[:, 1] - taus[:, 0])}


def read_journal(path: str | Path) -> list[dict]:
    """The per-prompt records of a `spec bench` journal (`OUT.jsonl`) in file order, read with `BenchJournal`'s
    own parser under the journal's stored signature (a torn last line is skipped; nothing is written)."""
    header = json.loads(Path(path).read_text().split("\n", 1)[0])
    return list(BenchJournal(path, header.get("signature") or {}).records.values())


class BenchJournal:
    """`spec bench`'s per-prompt records as JSON lines (`<out>.jsonl`), appended and flushed to disk as each prompt
    finishes, so a run that is stopped or killed loses at most the prompt it was on, and a rerun with the same
    arguments resumes from there (also with a larger --limit, or more prompt sets: what is done is kept).

    The first line holds the run's `signature` (the arguments that decide what a record means: target, draft,
    strategies, tokens, backend...) and the tree sizes chosen at the first start, which a resumed run reuses rather
    than measures again. A journal with another signature is refused (one `LeanLMError`, before any model loads),
    so records of different runs never mix; the file is locked while a run appends to it. Written by hand: a few
    lines of JSON and `fcntl.flock`, as in `leanlm.lock`."""

    def __init__(self, path: str | Path, signature: dict, also_accept: dict[str, Callable[[], object]] | None = None):
        """`also_accept`: for a signature key, a function giving one more value a stored header may hold for it and
        still mean the same run (called only on a mismatch): the weights digests of journals written before the
        digest was taken from `manifest.json` (`weights_digest(folder, legacy=True)`)."""
        self.path, self.signature = Path(path), signature
        self.also_accept = also_accept or {}
        self.header: dict | None = None
        self.records: dict[tuple[str, int], dict] = {}
        self._fd = None
        self._load(truncate=False)  # the signature is checked before any work; a torn line is cut once locked

    def _load(self, truncate: bool) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        *lines, torn = data.split(b"\n")  # `torn`: what follows the last newline, a line cut by a kill mid-write
        for i, line in enumerate(lines):
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError
            except ValueError:
                raise LeanLMError(f"--out: {self.path} has a damaged line {i + 1}. Fix: pass another --out (this "
                                  f"file is left as it is)") from None
            if i == 0:
                stored = obj.get("signature") or {}
                diff = sorted(k for k in set(self.signature) | set(stored)
                              if self.signature.get(k) != stored.get(k)
                              and not (k in self.also_accept and self.also_accept[k]() == stored.get(k)))
                if diff:
                    raise LeanLMError(f"--out: {self.path} holds prompts of a spec bench with other arguments "
                                      f"({', '.join(diff)}). Fix: pass the same arguments to resume it, or another "
                                      f"--out")
                self.header = obj
            else:
                self.records[(obj["prompts"], obj["index"])] = obj
        if torn and truncate:
            os.truncate(self.path, len(data) - len(torn))

    @property
    def sizes(self) -> dict | None:
        """The tree sizes stored at the first start (None: none were chosen, or nothing was written yet)."""
        return None if self.header is None else self.header.get("sizes")

    def lock(self) -> None:
        """Lock the file for appending (one `LeanLMError` if another run holds it) and read it again, now that no
        other run can be appending; a line cut by a kill mid-write is cut off."""
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = open(self.path, "a", encoding="utf-8")
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fd.close()
            self._fd = None
            raise LeanLMError(f"--out: {self.path} is being written by another spec bench. Fix: wait for it to "
                              f"finish, or pass another --out") from None
        self.records.clear()
        self._load(truncate=True)

    def start(self, sizes: dict | None = None) -> None:
        """Lock the file (`lock`) and, on a first start, write the header line with the chosen tree `sizes`."""
        self.lock()
        if self.header is None:
            self.header = {"signature": self.signature, "sizes": sizes}
            self._append(self.header)

    def done(self, set_name: str, index: int, prompt: str) -> dict | None:
        """The stored record of prompt `index` of `set_name`, if it was decoded (and is still the same prompt)."""
        r = self.records.get((set_name, index))
        return r if r is not None and r["sha"] == prompt_sha(prompt) else None

    def add(self, set_name: str, index: int, prompt: str, record: dict) -> None:
        if self.header is None or self._fd is None:
            raise RuntimeError("BenchJournal.add before start()")
        record = {"prompts": set_name, "index": index, "sha": prompt_sha(prompt)} | record
        self.records[(set_name, index)] = record
        self._append(record)

    def _append(self, obj: dict) -> None:
        self._fd.write(json.dumps(obj) + "\n")
        self._fd.flush()
        os.fsync(self._fd.fileno())

    def close(self) -> None:
        if self._fd is not None:
            self._fd.close()  # closing releases the lock
            self._fd = None


def prompt_sha(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


def weights_digest(folder: str | Path | None, legacy: bool = False) -> str | None:
    """A short digest of a folder's weights (a draft head, a classifier, a target checkpoint): of its
    `manifest.json` where it has one, else of its `.safetensors` files; so a journal resumed after the folder was
    replaced by other weights under the same name is refused. None for no folder or a name that is not one (a
    target alias such as "smollm2"). `legacy`: always of the `.safetensors` files, the digest journals written
    before the manifest was used hold (`BenchJournal`'s `also_accept`), so they still resume."""
    if folder is None or not Path(folder).is_dir():
        return None
    manifest = Path(folder) / "manifest.json"  # sha256 of every file, which loading verifies: no need to hash twice
    if manifest.is_file() and not legacy:
        return hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
    h = hashlib.sha256()
    for f in sorted(Path(folder).glob("*.safetensors")):
        h.update(f.name.encode() + sha256_file(f).encode())
    return h.hexdigest()[:16]


def run_bench(model, tokenizer, head, strategies: dict[str, TreeStrategy], prompt_sets: dict[str, list[str]],
              max_new_tokens: int, progress: bool = True,
              answers: dict[str, list[list[int]]] | None = None, compile: bool | str = False,
              journal: BenchJournal | None = None) -> list[dict]:
    """One row per prompt set and strategy (plain decoding as strategy "none"); `answers`, when given, receives the
    plain greedy answer (token ids) of every prompt, per set. Plain and speculative decoding share one target
    (`compile`: see `leanlm.speculative.target`) and one cache size, so compiled graphs are made once per width.
    With a `journal` (started), prompts it holds are not decoded again and every new one is appended to it as it
    finishes."""
    target = make_target(model, compile)
    widest = max([s.node_bound() or 256 for s in strategies.values()] + [1])
    longest = max(len(encode_chat(tokenizer, p)) for ps in prompt_sets.values() for p in ps)
    capacity = cache_capacity(longest, max_new_tokens, widest)
    rows = []
    for set_name, prompts in prompt_sets.items():
        records = [journal.done(set_name, i, p) if journal is not None else None for i, p in enumerate(prompts)]
        todo = [i for i, r in enumerate(records) if r is None]
        for i in tqdm(todo, desc=set_name, disable=not progress, leave=False, initial=len(prompts) - len(todo),
                      total=len(prompts)):
            records[i] = bench_prompt(target, tokenizer, head, strategies, prompts[i], max_new_tokens, capacity)
            if journal is not None:
                journal.add(set_name, i, prompts[i], records[i])
        if answers is not None:
            answers.setdefault(set_name, []).extend(r["answer"] for r in records)
        rows += summarize(set_name, records, strategies)
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
    """The rows as a markdown table; τ+1's 95% interval over prompts (`tau_interval`) beside it."""
    lines = ["| prompts | strategy | n | τ | τ+1 | τ+1 95% CI | candidates/step | draft ms/step | verify ms/step | tok/s "
             "| speed-up | identical |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["strategy"] == "none":
            lines.append(f"| {r['prompts']} | none | {r['n']} | | | | | | | {r['tokens_per_s']:.1f} | 1.00 | |")
        else:
            lo, hi = r.get("tau_ci95", (r["tau"], r["tau"]))
            lines.append(f"| {r['prompts']} | {r['describe']} | {r['n']} | {r['tau']:.2f} | {r['tau'] + 1:.2f} | "
                         f"{lo + 1:.2f}-{hi + 1:.2f} | "
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
