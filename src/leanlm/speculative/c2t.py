"""C2T: classifier-based token-tree construction (Huo, Tan et al. 2025, arXiv 2502.13652).

Instead of EAGLE-2's "grow a fixed number of layers, then keep the global top N", C2T grows the tree layer by layer
and asks a tiny classifier, per candidate node, whether the node is worth verifying:

    features of a node   P  joint draft probability of its path (linear scale, root = 1)
                         H  entropy (nats) of its parent's draft distribution, from that distribution's top-M
                            probabilities (M = 1000), not renormalised; siblings share it
                         d  0-based layer (the root's children are layer 0)
    classifier           Linear(3 -> 48) -> ReLU -> Linear(48 -> 1) -> sigmoid = confidence C
    growth (Alg. 1)      each surviving node of the layer proposes its top-K children by draft probability; the
                         classifier scores them; C < beta is pruned; optionally only the K most confident survive
                         (second pruning); survivors are verified and form the next frontier; stop at max_depth or
                         when nothing survives. No global rerank.

Choices the paper leaves open, each an option here (defaults = the paper's best reading, see docs/c2t.md):
  feature_scaling  "raw" (P in [0, 1], H in nats, integer d; the paper's reading, no normalisation) or "log"
                   (log P instead of P: separates the many tiny probabilities the raw scale squashes near 0)
  entropy_top      M of the top-M entropy (1000; None = full vocabulary)
  second_topk      the optional second pruning (K = 15 as in the paper's experiments; None disables it)

The tree is a deterministic function of the draft's outputs, so verification (greedy match or recursive rejection
sampling with one-hot proposals) stays lossless exactly as for every other strategy.

The data pipeline and the training loop (`collect_trees`, `train_classifier`, `cost_aware_beta`) are in
`leanlm.speculative.c2t_train`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from leanlm.checkpoint import (check_finite_tensors, load_state_into, load_tensors, read_json_object, verify_manifest,
                               write_folder_atomically)
from leanlm.errors import CheckpointError
from leanlm.speculative.tree import Drafter, TokenTree, TreeStrategy

FEATURE_SCALINGS = ("raw", "log")


def top_entropy(logp: torch.Tensor, top: int | None = 1000) -> torch.Tensor:
    """Entropy in nats of each row of log-probabilities [..., V] over its `top` largest probabilities (not
    renormalised; None = the whole vocabulary)."""
    if top is not None and top < logp.shape[-1]:
        logp = logp.topk(top, dim=-1).values
    return -(logp.exp() * logp).sum(-1)


class C2TClassifier(nn.Module):
    """The paper's classifier: Linear(3 -> hidden) -> ReLU -> Linear(hidden -> 1) -> sigmoid."""

    def __init__(self, hidden: int = 48, feature_scaling: str = "raw", entropy_top: int | None = 1000):
        super().__init__()
        if feature_scaling not in FEATURE_SCALINGS:
            raise ValueError(f"feature_scaling {feature_scaling!r} is unknown; use one of {FEATURE_SCALINGS}")
        self.hidden, self.feature_scaling, self.entropy_top = hidden, feature_scaling, entropy_top
        self.fc1 = nn.Linear(3, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def inputs(self, joint_logp: torch.Tensor, entropy: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        """[n, 3] classifier inputs from joint log-probabilities, parent entropies (nats) and 0-based depths."""
        p = joint_logp.float().clamp(min=-80.0)
        first = p if self.feature_scaling == "log" else p.exp()
        return torch.stack([first, entropy.float(), depth.float()], dim=-1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x))).squeeze(-1)  # [n]

    def forward(self, joint_logp: torch.Tensor, entropy: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        """Confidence C in (0, 1) per node [n]."""
        return torch.sigmoid(self.logits(self.inputs(joint_logp, entropy, depth)))

    # -- persistence ---------------------------------------------------------------------------------------------
    def save(self, path: str | Path, meta: dict | None = None) -> None:
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        cfg = {"hidden": self.hidden, "feature_scaling": self.feature_scaling, "entropy_top": self.entropy_top}

        def write(tmp: Path) -> None:
            (tmp / "c2t_config.json").write_text(json.dumps({"classifier": cfg, **(meta or {})}, indent=1,
                                                            default=str))
            save_file(state, str(tmp / "model.safetensors"))

        write_folder_atomically(Path(path), write)

    @classmethod
    def load(cls, path: str | Path) -> tuple["C2TClassifier", dict]:
        """Read a classifier written by `save`; a missing, damaged, garbage, NaN or mismatched folder is one
        CheckpointError (a NaN classifier would otherwise prune every node and decode with tau 0 silently)."""
        path = Path(path)
        if not (path / "c2t_config.json").exists() or not (path / "model.safetensors").exists():
            raise CheckpointError(f"{path} is not a C2T classifier (needs c2t_config.json and model.safetensors). "
                                  "Fix: train one with `leanlm spec c2t-train`")
        fix = "retrain it with `leanlm spec c2t-train`, or restore the folder"
        verify_manifest(path)
        meta = read_json_object(path / "c2t_config.json", "C2T classifier config", fix, required=("classifier",))
        spec = meta["classifier"]
        ok = (isinstance(spec, dict) and set(spec) <= {"hidden", "feature_scaling", "entropy_top"}
              and isinstance(spec.get("hidden", 48), int) and not isinstance(spec.get("hidden", 48), bool)
              and spec.get("hidden", 48) > 0 and spec.get("feature_scaling", "raw") in FEATURE_SCALINGS
              and (spec.get("entropy_top") is None or (isinstance(spec["entropy_top"], int)
                                                       and spec["entropy_top"] > 0)))
        if not ok:
            raise CheckpointError(f"C2T classifier config {path / 'c2t_config.json'} has an invalid 'classifier' "
                                  f"entry ({spec!r:.120}). Fix: {fix}")
        clf = cls(**spec)
        tensors = load_tensors(path / "model.safetensors", "C2T classifier weights", fix)
        check_finite_tensors(tensors, f"C2T classifier {path}", fix)
        load_state_into(clf, tensors, f"C2T classifier {path}", fix)
        return clf.eval(), meta


class C2T(TreeStrategy):
    """C2T's tree growth (Algorithm 1 of the paper) with a trained `C2TClassifier`."""

    name = "c2t"

    def __init__(self, classifier: C2TClassifier | str | Path, beta: float = 0.5, top_k: int = 15,
                 max_depth: int = 10, second_topk: int | None = 15, max_nodes: int | None = None):
        if isinstance(classifier, (str, Path)):
            classifier, _ = C2TClassifier.load(classifier)
        if not 0.0 < beta < 1.0 or top_k < 1 or max_depth < 1:
            raise ValueError("c2t needs 0 < beta < 1, top_k >= 1, max_depth >= 1")
        if not all(bool(torch.isfinite(p).all()) for p in classifier.parameters()):
            raise ValueError("the C2T classifier has NaN or infinite weights (it would prune every node); retrain it")
        self.clf = classifier.eval()
        self.beta, self.top_k, self.max_depth, self.second_topk = beta, top_k, max_depth, second_topk
        self.max_nodes = max_nodes  # optional cap on the whole tree (root included), e.g. a cost-aware budget

    @torch.no_grad()
    def grow(self, drafter: Drafter, root_token: int) -> TokenTree:
        k = self.top_k
        dist = drafter.root()[None]  # [1, V] children distributions of the frontier
        dev = dist.device
        if next(self.clf.parameters()).device != dev:  # the classifier follows the drafter's device
            self.clf.to(dev)
        tokens = [torch.tensor([root_token], device=dev)]
        parents = [torch.tensor([-1], device=dev)]
        logps = [torch.zeros(1, device=dev)]
        front = torch.zeros(1, dtype=torch.long, device=dev)  # node ids of the current frontier [n]
        f_logp = logps[0]  # [n]
        size = 1
        for d in range(self.max_depth):
            ent = top_entropy(dist, self.clf.entropy_top)  # [n]
            best = dist.topk(k, dim=-1)  # first pruning by generation probability: per-parent top-K
            joint = (f_logp[:, None] + best.values.float()).flatten()  # [n*K]
            conf = self.clf(joint, ent[:, None].expand(-1, k).flatten(),
                            torch.full((joint.numel(),), d, device=dev))  # [n*K]
            conf = torch.where(conf >= self.beta, conf, -1.0)  # pruned: below beta
            cap = joint.numel()
            if self.second_topk is not None:
                cap = min(cap, self.second_topk)
            if self.max_nodes is not None:
                cap = min(cap, self.max_nodes - size)
            kept = int((conf >= 0).sum())  # one host sync per layer: the tree's size decides the next expand
            cap = min(cap, kept)
            if cap <= 0:
                break
            keep = conf.topk(cap).indices.sort().values  # parent order, then child rank: parents before children
            new = size + torch.arange(cap, device=dev)
            tok = best.indices.flatten()[keep]
            par = front[keep // k]
            tokens.append(tok)
            parents.append(par)
            logps.append(joint[keep])
            size += cap
            if d + 1 == self.max_depth or (self.max_nodes is not None and size >= self.max_nodes):
                break
            dist = drafter.expand(new, tok, par)
            front, f_logp = new, joint[keep]
        return TokenTree(torch.cat(tokens), torch.cat(parents), torch.cat(logps))

    def node_bound(self) -> int:
        if self.max_nodes is not None:
            return self.max_nodes
        cap = self.second_topk or 10 ** 9
        total, front = 1, 1
        for _ in range(self.max_depth):
            front = min(cap, front * self.top_k)
            total += front
        return total

    def describe(self) -> str:
        extra = f", max_nodes={self.max_nodes}" if self.max_nodes else ""
        return (f"c2t(beta={self.beta}, top_k={self.top_k}, max_depth={self.max_depth}, "
                f"second_topk={self.second_topk}{extra})")
