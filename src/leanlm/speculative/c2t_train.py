"""C2T's data and training (the method itself is `leanlm.speculative.c2t`).

    collect_trees     grow full EAGLE-2 trees on training prompts, verify every node with the target in one forward,
                      label a node positive when it lies on the accepted (greedy) path; rows of (joint log-prob,
                      parent entropy, depth, label)
    train_classifier  BCE with negative sampling, Adam, a held-out split, the checkpoint chosen for recall first,
                      then the lower positive rate
    cost_aware_beta   the threshold that minimises the modelled step time given measured verification costs
Settings: `C2TTrainConfig` (`leanlm.speculative.c2t_config`), also the defaults of `leanlm spec c2t-train`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from leanlm.checkpoint import atomic_write_file
from leanlm.errors import CheckpointError, LeanLMError
from leanlm.speculative.c2t import C2TClassifier, top_entropy
from leanlm.speculative.c2t_config import C2TTrainConfig
from leanlm.speculative.cost import interpolate_seconds
from leanlm.speculative.draft import DraftSession
from leanlm.speculative.engine import SpeculativeDecoder
from leanlm.speculative.target import make_target
from leanlm.speculative.tree import Eagle2, TokenTree, TreeStrategy

__all__ = ["C2TTrainConfig", "CollectStats", "EntropyRecorder", "auc", "choose_epoch", "classifier_metrics",
           "collect_trees", "cost_aware_beta", "load_rows", "replay", "save_rows", "train_classifier"]


# -- data: full EAGLE-2 trees, every node verified ------------------------------------------------------------------

class EntropyRecorder:
    """Wraps a `Drafter` and records, for every node it returns a distribution for, the top-M entropy of that
    distribution (node 0 = root), so the tree's nodes can be given their parent's entropy afterwards."""

    def __init__(self, drafter, top: int | None = 1000):
        self.drafter, self.top = drafter, top
        self.entropy: dict[int, float] = {}

    def root(self) -> torch.Tensor:
        out = self.drafter.root()
        self.entropy = {0: float(top_entropy(out, self.top))}
        return out

    def expand(self, nodes, tokens, parents) -> torch.Tensor:
        out = self.drafter.expand(nodes, tokens, parents)
        for n, h in zip(torch.as_tensor(nodes).tolist(), top_entropy(out, self.top).tolist()):
            self.entropy[n] = h
        return out

    def __getattr__(self, name):  # prefill / end_tree / anything else goes to the wrapped drafter
        return getattr(self.drafter, name)


ROW_FIELDS = ("joint_logp", "entropy", "depth", "label", "tree", "node", "parent")


@dataclass
class CollectStats:
    trees: int = 0
    nodes: int = 0
    positives: int = 0
    seconds: float = 0.0


def collect_trees(target, head, prompts: list[torch.Tensor], max_new_tokens: int = 64, top_k: int = 10,
                  depth: int = 10, entropy_top: int | None = 1000, eos_token_id: int | None = None,
                  progress: bool = True) -> tuple[dict[str, torch.Tensor], CollectStats]:
    """Rows for every drafted node of full EAGLE-2 trees: joint_logp, entropy (of the parent's distribution),
    depth (0-based layer), label, and where the node sits: tree (step number), node, parent (0 = root).

    The trees keep every candidate (total_tokens = 1 + top_k + (depth - 1) * top_k**2, the paper's 1011 for
    top_k = depth = 10), the target verifies all of them in one forward, and a node is labelled positive when it
    lies on the accepted (greedy) path. Decoding itself is ordinary lossless speculative decoding with that tree.
    prompts: token ids [1, T] each.
    """
    tgt = make_target(target)
    total = 1 + top_k + (depth - 1) * top_k * top_k
    strategy = Eagle2(total_tokens=total, depth=depth, top_k=top_k)

    def factory():
        return EntropyRecorder(DraftSession(head, tgt.embed_tokens, tgt.lm_head), entropy_top)

    rows: dict[str, list] = {k: [] for k in ROW_FIELDS}
    stats = CollectStats()
    t0 = time.perf_counter()
    spec = SpeculativeDecoder(tgt, head, _RecordingStrategy(strategy, rows, stats), drafter_factory=factory,
                              keep_trees=True)
    for ids in tqdm(prompts, desc="c2t trees", disable=not progress, leave=False):
        _, st = spec.generate(ids, max_new_tokens, eos_token_id=eos_token_id)
        for tree, path in zip(st.trees, st.accepted_paths):  # same order as the features appended by grow()
            on_path = set(path)
            labels = [1.0 if i in on_path else 0.0 for i in range(1, len(tree))]
            rows["label"] += labels
            stats.positives += int(sum(labels))
    stats.seconds = time.perf_counter() - t0
    out = {k: torch.tensor(v, dtype=torch.long if k in ("depth", "tree", "node", "parent") else torch.float32)
           for k, v in rows.items()}
    if not (len(out["label"]) == len(out["depth"]) == len(out["entropy"]) == len(out["joint_logp"])):
        raise RuntimeError("c2t collection lost track of its rows")
    return out, stats


class _RecordingStrategy(TreeStrategy):
    """Grows the wrapped strategy's tree and appends each drafted node's features (the labels come after
    verification)."""

    def __init__(self, inner: Eagle2, rows: dict[str, list], stats: CollectStats):
        self.inner, self.rows, self.stats = inner, rows, stats

    def node_bound(self) -> int:
        return self.inner.node_bound()

    def grow(self, drafter, root_token: int) -> TokenTree:
        tree = self.inner.grow(drafter, root_token)
        pool = tree.extras["pool"].tolist()  # tree node -> drafter node id (data collection, not the hot path)
        ent = drafter.entropy
        depths, parents, logp = tree.depths().tolist(), tree.parents.tolist(), tree.logp.tolist()
        for i in range(1, len(tree)):
            self.rows["joint_logp"].append(logp[i])
            self.rows["entropy"].append(ent[pool[parents[i]]])
            self.rows["depth"].append(depths[i] - 1)
            self.rows["tree"].append(self.stats.trees)
            self.rows["node"].append(i)
            self.rows["parent"].append(parents[i])
        self.stats.trees += 1
        self.stats.nodes += len(tree) - 1
        return tree


COMPACT_DTYPES = {"depth": torch.int16, "node": torch.int16, "parent": torch.int16, "tree": torch.int32,
                  "entropy": torch.float16, "label": torch.uint8}  # joint_logp stays float32 (log P reaches -30)


def save_rows(rows: dict[str, torch.Tensor], path: str | Path, meta: dict, compact: bool = False) -> None:
    """Features + labels as one safetensors file (written atomically) with `meta` in its header. `compact` stores
    the indices in 16 bits (32 for the tree id), the entropy in float16 and the labels as bytes: about 2/5 of the
    size, for a file that is committed (`load_rows` widens them again)."""
    tensors = {k: v.contiguous() for k, v in rows.items()}
    if compact:
        for k, dtype in COMPACT_DTYPES.items():
            if k in tensors:
                v = tensors[k]
                if not dtype.is_floating_point and len(v) and int(v.abs().max()) > torch.iinfo(dtype).max:
                    raise ValueError(f"{k} holds values beyond {dtype}; save it without compact")
                tensors[k] = v.to(dtype)
    atomic_write_file(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)}))


def load_rows(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The rows and meta of a `save_rows` file; a missing, truncated or garbage file is one CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is not a C2T data file. Fix: make one with `leanlm spec c2t-collect`")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
            rows = {k: f.get_tensor(k) for k in f.keys()}
        rows = {k: v.float() if v.is_floating_point() or k == "label" else v.long() for k, v in rows.items()}
    except Exception as exc:  # noqa: BLE001 - truncated or garbage file
        raise CheckpointError(f"{path} is not a readable C2T data file ({type(exc).__name__}: {exc}). Fix: re-collect "
                              f"it with `leanlm spec c2t-collect`") from None
    missing = {"joint_logp", "entropy", "depth", "label"} - set(rows)
    if missing:
        raise CheckpointError(f"{path} lacks {sorted(missing)}. Fix: re-collect it with `leanlm spec c2t-collect`")
    return rows, meta


# -- training -------------------------------------------------------------------------------------------------------

def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
    pos = labels > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = scores.argsort()
    ranks = torch.empty_like(scores, dtype=torch.float64)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    sorted_scores = scores[order]
    # average the ranks of tied scores
    uniq, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    if len(uniq) < len(scores):
        sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, ranks[order])
        ranks[order] = (sums / counts)[inverse]
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classifier_metrics(conf: torch.Tensor, labels: torch.Tensor, beta: float) -> dict:
    pred = conf >= beta
    pos = labels > 0.5
    tp = int((pred & pos).sum())
    return {"precision": tp / max(1, int(pred.sum())), "recall": tp / max(1, int(pos.sum())),
            "positive_rate": float(pred.float().mean()), "auc": auc(conf, labels)}


def choose_epoch(logs: list[dict], auc_tolerance: float = 0.01, recall_tolerance: float = 0.005) -> int:
    """The paper's rule, recall first, then the lower positive rate, applied among the well-trained epochs (held-out
    AUC within `auc_tolerance` of the best): without that filter an untrained epoch that calls everything positive
    (recall 1, positive rate 1) would win."""
    best_auc = max(m["auc"] for m in logs if m["auc"] == m["auc"])  # skip NaN
    ok = [m for m in logs if m["auc"] == m["auc"] and m["auc"] >= best_auc - auc_tolerance]
    top = max(m["recall"] for m in ok)
    return min((m for m in ok if m["recall"] >= top - recall_tolerance), key=lambda m: m["positive_rate"])["epoch"]


def train_classifier(rows: dict[str, torch.Tensor], cfg: C2TTrainConfig,
                     progress: bool = True) -> tuple[C2TClassifier, list[dict]]:
    """BCE training with negative sampling (fresh negatives each epoch); split by tree (held-out trees are never
    seen); the epoch kept is chosen by `choose_epoch` (recall at `cfg.beta` first, among well-trained epochs)."""
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    clf = C2TClassifier(cfg.hidden, cfg.feature_scaling, cfg.entropy_top)
    x = clf.inputs(rows["joint_logp"], rows["entropy"], rows["depth"])
    y = rows["label"].float()
    tree = rows.get("tree", torch.arange(len(y)))
    trees = tree.unique()
    held = trees[torch.randperm(len(trees), generator=g)[: max(1, int(len(trees) * cfg.val_fraction))]]
    val = torch.isin(tree, held)
    xt, yt, xv, yv = x[~val], y[~val], x[val], y[val]
    if int(yt.sum()) == 0:
        raise LeanLMError("the C2T data's training split has no accepted node, so there is nothing to learn. Fix: "
                          "collect more trees (--prompts) or use a better-trained draft head")
    opt = torch.optim.Adam(clf.parameters(), lr=cfg.lr)
    pos_idx, neg_idx = (yt > 0.5).nonzero().flatten(), (yt <= 0.5).nonzero().flatten()
    logs, states = [], []
    for epoch in tqdm(range(cfg.epochs), desc="c2t classifier", disable=not progress, leave=False):
        if cfg.neg_ratio and len(neg_idx) > cfg.neg_ratio * len(pos_idx):
            neg = neg_idx[torch.randperm(len(neg_idx), generator=g)[: int(cfg.neg_ratio * len(pos_idx))]]
        else:
            neg = neg_idx
        idx = torch.cat([pos_idx, neg])
        idx = idx[torch.randperm(len(idx), generator=g)]
        clf.train()
        total = 0.0
        for s in range(0, len(idx), cfg.batch_size):
            b = idx[s:s + cfg.batch_size]
            loss = nn.functional.binary_cross_entropy_with_logits(clf.logits(xt[b]), yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
        clf.eval()
        with torch.no_grad():
            conf = torch.sigmoid(clf.logits(xv))
        m = {"epoch": epoch, "train_bce": total / len(idx), **classifier_metrics(conf, yv, cfg.beta)}
        logs.append(m)
        states.append({k: v.clone() for k, v in clf.state_dict().items()})
    best_epoch = choose_epoch(logs)
    for m in logs:
        m["chosen"] = m["epoch"] == best_epoch
    best_state = states[best_epoch]
    clf.load_state_dict(best_state)
    return clf.eval(), logs




# -- offline replay and the cost-aware threshold --------------------------------------------------------------------

def replay(classifier: C2TClassifier, rows: dict[str, torch.Tensor], beta: float) -> dict:
    """Replay threshold pruning on collected full trees: a node is kept when its confidence is >= beta and its
    parent was kept; the accepted length is the number of kept positives (positives form the accepted path).
    Returns the mean accepted length tau, mean verified nodes per tree (root included) and mean depth reached.
    An estimate: the collected trees hold EAGLE-2's top-k children of its top-k frontier, and the second pruning is
    not replayed, so C2T's own trees differ somewhat."""
    with torch.no_grad():
        keep = classifier(rows["joint_logp"], rows["entropy"], rows["depth"]) >= beta
    tree, parent = rows["tree"], rows["parent"]
    first = torch.zeros(int(tree.max()) + 1, dtype=torch.long)
    first.scatter_reduce_(0, tree, torch.arange(len(tree)), reduce="amin", include_self=False)
    parent_row = first[tree] + parent - 1  # rows of a tree are its nodes 1..N-1 in order
    has_parent = parent > 0
    for d in range(1, int(rows["depth"].max()) + 1):
        at = (rows["depth"] == d) & has_parent
        keep[at] &= keep[parent_row[at]]
    trees = len(first)
    kept_depth = torch.zeros(trees).scatter_reduce_(0, tree, torch.where(keep, rows["depth"] + 1, 0).float(),
                                                    reduce="amax")
    return {"beta": beta, "tau": float((keep & (rows["label"] > 0.5)).sum()) / trees,
            "nodes": 1 + float(keep.sum()) / trees, "layers": float(kept_depth.mean())}


def cost_aware_beta(classifier: C2TClassifier, rows: dict[str, torch.Tensor], verify_seconds: dict[int, float],
                    draft_layer_seconds: float, betas: list[float] | None = None,
                    overhead_seconds: float = 0.0) -> tuple[float, list[dict]]:
    """Pick beta for this hardware: for each beta, replay the collected trees (`replay`) for the expected accepted
    length tau(beta), tree size n(beta) and layers drafted; a step costs draft_layer_seconds * layers + the measured
    verification time of n tokens (interpolated in `verify_seconds`) + `overhead_seconds` (the engine's per-step
    work outside both, `cost.step_overhead_seconds`); choose the beta with the most tokens per second,
    (tau + 1) / step time. Returns (beta, table)."""
    betas = betas or [round(0.05 * i, 2) for i in range(1, 20)]
    table = []
    for b in betas:
        r = replay(classifier, rows, b)
        step = (draft_layer_seconds * max(1.0, r["layers"]) + interpolate_seconds(verify_seconds, r["nodes"])
                + overhead_seconds)
        table.append({**r, "step_seconds": step, "tokens_per_second": (r["tau"] + 1) / step})
    best = max(table, key=lambda r: r["tokens_per_second"])
    return best["beta"], table
