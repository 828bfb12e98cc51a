"""The GPU check script (`benchmarks/gpu_check.py`) in its CPU smoke mode, and what CPU can test of the CUDA fixes:
a target and draft head in float64 (a tensor made in the default dtype instead of the model's shows up here the way
a CPU tensor shows up on CUDA), greedy and sampled, for every strategy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from leanlm.speculative.c2t import C2T, C2TClassifier
from leanlm.speculative.draft import EagleDraftHead, head_config
from leanlm.speculative.engine import SpeculativeDecoder, plain_generate
from leanlm.speculative.tree import Chain, Eagle2, StaticTree

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(900)
def test_gpu_check_smoke_runs_every_part(tmp_path):
    pytest.importorskip("triton")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=880)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert proc.returncode == 0, (proc.stdout[-2000:], {k: v.get("tail") or v.get("error") for k, v in
                                                        report["parts"].items()})
    assert set(report["parts"]) == {"kernel_tests", "kernels", "speculative", "training"}
    assert all(p["status"] == "ok" for p in report["parts"].values())
    assert " passed" in report["parts"]["kernel_tests"]["summary"]
    spec = report["parts"]["speculative"]["result"]
    assert spec["identical"] and all(v.split("/")[0] == v.split("/")[1] for v in spec["identical"].values())
    assert spec["stats"]["eagle2/self"]["tau"] > 1  # the target drafting for itself is accepted deep
    assert sorted(map(int, spec["verify_ms"])) == [1, 2, 4, 8] and spec["draft_layer_ms"] > 0
    assert {r["strategy"] for r in spec["predicted"]} >= {"plain"} and len(spec["predicted"]) >= 3
    assert report["parts"]["training"]["result"]["models"]["leanlm"]["tokens_per_s"] > 0
    assert (tmp_path / "kernels" / "kernels.json").exists()
    md = (tmp_path / "gpu_check.md").read_text()
    assert "Predicted" in md and "| speculative | ok |" in md


def _float64_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)  # spread logits: random heads give near-uniform ones
    head = EagleDraftHead(head_config(cfg)).eval()
    return model.double(), head.double()


@pytest.mark.parametrize("strategy", [Chain(4), StaticTree(), Eagle2(total_tokens=12, depth=4, top_k=3), "c2t"],
                         ids=["chain", "static", "eagle2", "c2t"])
def test_float64_target_and_head(strategy):
    model, head = _float64_llama()
    if strategy == "c2t":
        strategy = C2T(C2TClassifier(hidden=8, feature_scaling="log"), beta=0.01, top_k=3, max_depth=3)
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(3))
    ref, _ = plain_generate(model, ids, 16)
    got, stats = SpeculativeDecoder(model, head, strategy).generate(ids, 16)
    assert got == ref and stats.steps > 0
    # sampling goes through process_logits / sample_accept with float64 logits
    out, _ = SpeculativeDecoder(model, head, strategy).generate(ids, 12, temperature=0.8, top_k=20, seed=1)
    assert len(out) == 12 and all(0 <= t < 96 for t in out)


def test_cost_model_measures_on_the_models_device_and_dtype():
    from leanlm.speculative.cost import draft_layer_seconds, verify_seconds

    model, head = _float64_llama()
    costs = verify_seconds(model, [1, 4], context=16, repeats=1)
    assert set(costs) == {1, 4} and all(v > 0 for v in costs.values())
    assert draft_layer_seconds(head, model, width=3, context=16, repeats=1) > 0
