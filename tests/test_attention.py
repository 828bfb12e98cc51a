"""MLA, GLA, NSA and ASA: every kind trains, decodes incrementally exactly like the full forward (across block and
window boundaries), generates, saves/loads, rolls back, and accounts for its cache to the byte."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from leanlm.attention import ATTENTION_REGISTRY
from leanlm.attention import sparse as ops
from leanlm.attention.nsa import SparseBranches
from leanlm.config import LeanLMConfig
from leanlm.errors import ConfigError
from leanlm.model import LeanLMForCausalLM

BASE = dict(vocab_size=97, hidden_size=64, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
            max_position_embeddings=256, nsa_window=32, nsa_select_count=4, window_cache_margin=8)

# (name, attention, extra fields): small blocks and windows so 90-token sequences cross every boundary.
KINDS = [
    ("gqa", "gqa", {}),
    ("mla", "mla", {}),
    ("mla-qlora", "mla", {"q_lora_rank": 48}),
    ("gla", "gla", {}),
    ("nsa", "nsa", dict(nsa_compress_block=16, nsa_compress_stride=8, nsa_select_block=16)),
    ("nsa-mlp-q2", "nsa", dict(nsa_compress_block=8, nsa_compress_stride=4, nsa_select_block=16,
                               nsa_compressor="mlp", nsa_query_group=2)),
    ("asa", "asa", dict(nsa_compress_block=8, nsa_compress_stride=8, nsa_select_block=8)),
    ("asa-q1-mlp", "asa", dict(nsa_compress_block=8, nsa_compress_stride=8, nsa_select_block=8, nsa_query_group=1,
                               nsa_compressor="mlp")),
    ("asa-global-first", "asa", dict(nsa_compress_block=8, nsa_compress_stride=8, nsa_select_block=8,
                                     asa_pattern="alternate_global_first", nsa_gates=False, asa_local_gate=False)),
    ("asa-nsa-pattern", "asa", dict(nsa_compress_block=8, nsa_compress_stride=4, nsa_select_block=8,
                                    asa_pattern="nsa")),
]
IDS = [k[0] for k in KINDS]


def make(attention: str, **extra) -> LeanLMForCausalLM:
    torch.manual_seed(0)
    return LeanLMForCausalLM(LeanLMConfig(attention=attention, **{**BASE, **extra})).double().eval()


def incremental_logits(model, ids: torch.Tensor, prefill: int, steps: list[int]) -> torch.Tensor:
    out = model(ids[:, :prefill], use_cache=True)
    cache, logits, i, k = out.past_key_values, [out.logits], prefill, 0
    while i < ids.shape[1]:
        n = min(steps[k % len(steps)], ids.shape[1] - i)
        logits.append(model(ids[:, i:i + n], past_key_values=cache, use_cache=True).logits)
        i, k = i + n, k + 1
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("name,attention,extra", KINDS, ids=IDS)
def test_incremental_decoding_matches_full_forward(name, attention, extra):
    model = make(attention, **extra)
    ids = torch.randint(0, 97, (2, 90), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        for prefill, steps in ((1, [1]), (37, [1, 3, 1, 5, 2, 7]), (64, [16])):
            inc = incremental_logits(model, ids, prefill, steps)
            torch.testing.assert_close(inc, full, rtol=1e-9, atol=1e-9)


@settings(max_examples=12, deadline=None)
@given(kind=st.sampled_from(["nsa", "asa", "asa-nsa-pattern", "nsa-mlp-q2"]), length=st.integers(1, 80),
       prefill=st.integers(1, 40), step=st.integers(1, 9))
def test_incremental_matches_full_forward_any_split(kind, length, prefill, step):
    _, attention, extra = KINDS[IDS.index(kind)]
    model = make(attention, **extra)
    ids = torch.randint(0, 97, (1, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        inc = incremental_logits(model, ids, min(prefill, length), [step])
    torch.testing.assert_close(inc, full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name,attention,extra", KINDS, ids=IDS)
def test_training_backward_reaches_every_parameter(name, attention, extra):
    torch.manual_seed(0)
    model = LeanLMForCausalLM(LeanLMConfig(attention=attention, **{**BASE, **extra})).train()
    ids = torch.randint(0, 97, (2, 70))
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


@pytest.mark.parametrize("attention", ["mla", "gla"])
def test_absorbed_and_expanded_attention_agree(attention):
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expanded = make(attention, latent_absorb="never")(ids).logits
        absorbed = make(attention, latent_absorb="always")(ids).logits
    torch.testing.assert_close(absorbed, expanded, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name,attention,extra", KINDS, ids=IDS)
def test_cache_accounting_is_exact(name, attention, extra):
    model = make(attention, **extra).float()
    ids = torch.randint(0, 97, (3, 120))
    with torch.no_grad():
        cache = model(ids[:, :50], use_cache=True).past_key_values
        for i in range(50, 120):
            model(ids[:, i:i + 1], past_key_values=cache, use_cache=True)
    cfg = model.config
    predicted = sum(ATTENTION_REGISTRY[k].cache_bytes(cfg, i, 120, 4) for i, k in enumerate(cfg.layer_attention))
    assert cache.nbytes() == 3 * predicted


@pytest.mark.parametrize("name,attention,extra", KINDS, ids=IDS)
def test_generate_greedy_matches_argmax_loop(name, attention, extra):
    model = make(attention, **extra)
    prompt = torch.randint(1, 97, (2, 30), generator=torch.Generator().manual_seed(5))
    out = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    ids = prompt
    with torch.no_grad():
        for _ in range(12):
            ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


@pytest.mark.parametrize("name,attention,extra", KINDS[3:], ids=IDS[3:])
def test_save_and_load_round_trip(name, attention, extra, tmp_path):
    model = make(attention, **extra)
    model.save_pretrained(tmp_path)
    again = LeanLMForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert again.config.layer_attention == model.config.layer_attention
    ids = torch.randint(0, 97, (1, 50))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)


@pytest.mark.parametrize("name,attention,extra", KINDS, ids=IDS)
def test_crop_rolls_back_like_speculative_decoding(name, attention, extra):
    model = make(attention, **extra)
    ids = torch.randint(0, 97, (1, 80), generator=torch.Generator().manual_seed(7))
    wrong = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = model(ids[:, :60], use_cache=True).past_key_values
        model(wrong, past_key_values=cache, use_cache=True)  # a rejected draft of 6 tokens
        cache.crop(60)
        assert cache.get_seq_length() == 60
        rest = model(ids[:, 60:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(rest, full[:, 60:], rtol=1e-9, atol=1e-9)


def test_window_cache_refuses_to_roll_back_past_its_margin():
    model = make("asa", nsa_compress_block=8, nsa_compress_stride=8, nsa_select_block=8)
    with torch.no_grad():
        cache = model(torch.randint(0, 97, (1, 100)), use_cache=True).past_key_values
    with pytest.raises(ValueError, match="window_cache_margin"):
        cache.crop(100 - 9)  # margin is 8 tokens


def test_padded_batches_are_refused_by_sparse_kinds_and_exact_for_latent_kinds():
    ids = torch.randint(1, 97, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, :5] = 0
    with pytest.raises(ValueError, match="unpadded"):
        make("nsa", nsa_compress_block=16, nsa_compress_stride=8, nsa_select_block=16)(ids, attention_mask=mask)
    for kind in ("mla", "gla"):
        model = make(kind)
        with torch.no_grad():
            batch = model(ids, attention_mask=mask).logits[0, 5:]
            alone = model(ids[:1, 5:]).logits[0]
        torch.testing.assert_close(batch, alone, rtol=1e-9, atol=1e-9)


# -- the sparse branches against a per-query loop written from the paper's definitions ------------------------------
def naive_branches(q, k, v, l, d, ls, n, init, local, w, scale):
    """Per (batch, group, query) loops; returns cmp, slc, win outputs [B, H, T, Dv] and the chosen block sets."""
    b, h, t, _ = q.shape
    g = k.shape[1]
    rep = h // g
    outs = {x: torch.zeros(b, h, t, v.shape[-1], dtype=q.dtype) for x in ("cmp", "slc", "win")}
    chosen = {}
    for bi in range(b):
        for gi in range(g):
            for p in range(t):
                blocks = [m for m in range(t) if m * d + l - 1 <= p]
                kc = torch.stack([k[bi, gi, m * d:m * d + l].mean(0) for m in blocks]) if blocks else None
                vc = torch.stack([v[bi, gi, m * d:m * d + l].mean(0) for m in blocks]) if blocks else None
                imp = [0.0] * (p // ls + 1)
                for hi in range(gi * rep, (gi + 1) * rep):
                    if blocks:
                        pr = torch.softmax(q[bi, hi, p] @ kc.T * scale, -1)
                        outs["cmp"][bi, hi, p] = pr @ vc
                        for mi, m in enumerate(blocks):
                            for j in range(len(imp)):
                                if m * d < (j + 1) * ls and m * d + l > j * ls:
                                    imp[j] += pr[mi].item()
                cur = p // ls
                forced = {j for j in range(cur + 1) if j < init or j > cur - local}
                rest = sorted((j for j in range(cur + 1) if j not in forced), key=lambda j: -imp[j])
                sel = sorted(forced | set(rest[: max(0, n - len(forced))]))
                chosen[(bi, gi, p)] = set(sel)
                toks = [s for s in range(p + 1) if s // ls in sel]
                win = list(range(max(0, p - w + 1), p + 1))
                for hi in range(gi * rep, (gi + 1) * rep):
                    for name, keys in (("slc", toks), ("win", win)):
                        a = torch.softmax(k[bi, gi, keys] @ q[bi, hi, p] * scale, -1)
                        outs[name][bi, hi, p] = a @ v[bi, gi, keys]
    return outs, chosen


@pytest.mark.parametrize("l,d,ls,n", [(4, 4, 4, 3), (8, 4, 8, 3), (4, 2, 8, 4)])
def test_sparse_branches_match_a_per_query_loop(l, d, ls, n):
    gen = torch.Generator().manual_seed(11)
    b, h, g, t, dk, dv = 1, 4, 2, 27, 6, 5
    q, k = torch.randn(b, h, t, dk, generator=gen, dtype=torch.float64), torch.randn(b, g, t, dk, generator=gen,
                                                                                     dtype=torch.float64)
    v = torch.randn(b, g, t, dv, generator=gen, dtype=torch.float64)
    scale, w = dk ** -0.5, 6
    pos = torch.arange(t)
    kc, vc = ops.compress(k, l, d), ops.compress(v, l, d)
    cmp, lse = ops.compression_attention(q, kc, vc, 0, l, d, scale)
    idx = ops.select_blocks(q, kc, lse, pos, n, l, d, ls, 1, 2, scale)
    slc = ops.selection_attention(q, k, v, idx, 0, 0, ls, scale)
    win = ops.window_attention(q, k, v, 0, 0, w, scale)
    want, chosen = naive_branches(q, k, v, l, d, ls, n, 1, 2, w, scale)
    torch.testing.assert_close(cmp, want["cmp"])
    torch.testing.assert_close(win, want["win"])
    for (bi, gi, p), sel in chosen.items():
        assert {int(j) for j in idx[bi, gi, p] if j >= 0} == sel
    torch.testing.assert_close(slc, want["slc"])


def test_query_groups_reuse_the_selection_of_their_first_token():
    cfg = LeanLMConfig(attention="asa", **{**BASE, "nsa_compress_block": 8, "nsa_compress_stride": 8,
                                           "nsa_select_block": 8, "nsa_query_group": 4, "nsa_select_count": 2,
                                           "nsa_local_blocks": 1})
    branches = SparseBranches(cfg, 1, 6, 6, 2, ("cmp", "slc"))
    gen = torch.Generator().manual_seed(2)
    q, kc = torch.randn(1, 4, 64, 6, generator=gen), torch.randn(1, 2, 7, 6, generator=gen)
    _, lse = ops.compression_attention(q, kc, kc, 0, 8, 8, 1.0)
    pos = torch.arange(64)
    per_token = ops.select_blocks(q, kc, lse, pos, 2, 8, 8, 8, 1, 1, 1.0)
    grouped = branches._selection(lambda rows: ops.select_blocks(q[:, :, rows], kc, lse[:, :, rows], pos[rows], 2,
                                                                 8, 8, 8, 1, 1, 1.0), pos, 0, None)
    for p in range(64):
        assert torch.equal(grouped[:, :, p], per_token[:, :, p - p % 4])
    assert not torch.equal(grouped, per_token)  # the reuse is real, not a no-op


# -- configuration --------------------------------------------------------------------------------------------------
def test_asa_patterns_resolve_per_layer():
    cfg = LeanLMConfig(attention="asa", **BASE)
    assert [cfg.asa_role(i) for i in range(4)] == ["local", "global", "local", "global"]
    assert (cfg.nsa_compress_block, cfg.nsa_select_block, cfg.nsa_query_group) == (16, 16, 4)
    cfg = LeanLMConfig(attention="asa", asa_pattern="alternate_global_first", **BASE)
    assert [cfg.asa_role(i) for i in range(4)] == ["global", "local", "global", "local"]
    cfg = LeanLMConfig(attention="asa", asa_pattern=["local", "local", "global", "both"], **BASE)
    assert [cfg.asa_role(i) for i in range(4)] == ["local", "local", "global", "both"]
    nsa = LeanLMConfig(attention="nsa", **{**BASE, "nsa_window": 64})
    assert (nsa.nsa_compress_block, nsa.nsa_compress_stride, nsa.nsa_select_block) == (32, 16, 64)


@pytest.mark.parametrize("attention,extra,field", [
    ("nsa", {"nsa_window": 40, "nsa_select_block": 16, "nsa_compress_block": 16}, "nsa_window"),
    ("nsa", {"nsa_select_count": 20, "nsa_select_block": 16, "nsa_compress_block": 16}, "nsa_select_count"),
    ("asa", {"nsa_select_count": [4, 4]}, "nsa_select_count"),
    ("nsa", {"nsa_compress_stride": 12}, "nsa_compress_stride"),
    ("gla", {"gla_kv_lora_rank": 250, "gla_latent_heads": 4}, "gla_kv_lora_rank"),
    ("gla", {"gla_latent_heads": 3, "gla_kv_lora_rank": 96}, "gla_latent_heads"),
    ("mla", {"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
    ("mla", {"latent_absorb": "sometimes"}, "latent_absorb"),
    ("asa", {"asa_pattern": "zigzag"}, "asa_pattern"),
    ("asa", {"asa_pattern": ["local", "global"]}, "asa_pattern"),
    ("asa", {"nsa_query_group": 3}, "nsa_query_group"),
    ("nsa", {"nsa_compressor": "max", "nsa_window": 64}, "nsa_compressor"),
])
def test_bad_sparse_and_latent_configs_name_the_field(attention, extra, field):
    with pytest.raises(ConfigError) as err:
        LeanLMConfig(attention=attention, **{**BASE, **extra})
    assert err.value.field == field


def test_asa_halves_the_long_context_cache_of_nsa():
    from leanlm.kvreport import kv_report

    cfg = LeanLMConfig(attention="asa", vocab_size=1000, hidden_size=1024, num_hidden_layers=24,
                       num_attention_heads=16, num_key_value_heads=4, head_dim=64, max_position_embeddings=8192)
    rows = {r["variant"]: r for r in kv_report(cfg, [131072])}
    ratio = rows["asa"]["bytes_per_token"][0] / rows["nsa"]["bytes_per_token"][0]
    assert 0.45 < ratio < 0.6
    gqa = rows["gqa"]["bytes_per_token"][0]
    assert gqa == 24 * 2 * 4 * 64 * 2  # K and V, 4 heads of 64, bf16, 24 layers
    assert math.isclose(rows["gqa"]["bytes_per_sequence"][0], gqa * 131072)


def test_right_padded_scoring_batches_are_exact_for_sparse_kinds():
    """Batched log-likelihood scoring right-pads; real tokens come first, so their logits are unaffected."""
    model = make("asa", nsa_compress_block=8, nsa_compress_stride=8, nsa_select_block=8)
    ids = torch.randint(1, 97, (2, 50))
    mask = torch.ones(2, 50, dtype=torch.long)
    mask[1, 35:] = 0
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits[1, :35]
        alone = model(ids[1:, :35]).logits[0]
    torch.testing.assert_close(batch, alone, rtol=1e-9, atol=1e-9)


def test_kv_report_cli(tmp_path, capsys):
    from leanlm.cli import main

    out = tmp_path / "kv.json"
    assert main(["kv-report", "tiny", "--context", "1k,4k", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| asa |" in text and "| nsa |" in text
    rows = {r["variant"]: r for r in json.loads(out.read_text())}
    cfg = LeanLMConfig(**__import__("yaml").safe_load(open(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"))["model"])
    assert rows["gqa"]["bytes_per_token"] == [2 * cfg.num_key_value_heads * cfg.head_dim * 2 * cfg.num_hidden_layers] * 2
    assert rows["asa"]["bytes_per_sequence"][1] < rows["nsa"]["bytes_per_sequence"][1]
    assert main(["kv-report", "tiny", "--context", "8q"]) == 2
    assert "--context" in capsys.readouterr().err
