"""Triton kernels against their PyTorch references (leanlm.attention.sparse, dense SDPA): forward outputs and every
gradient, per dtype, plus whole NSA/ASA/MLA models with LEANLM_KERNELS=triton vs torch (training and incremental
decoding). On this CPU machine the kernels run in Triton's interpreter (TRITON_INTERPRET=1) at tiny shapes; on a
GPU the same tests run natively with `LEANLM_TEST_DEVICE=cuda` (bf16 included: the interpreter's bf16 tl.dot is
not exact, so bf16 is checked on GPU only)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton.jit decorates anything

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from leanlm.attention import sparse as ref  # noqa: E402
from leanlm.config import LeanLMConfig  # noqa: E402
from leanlm.errors import ConfigError  # noqa: E402
from leanlm.kernels import banded, decode, selection, topk, use_kernels  # noqa: E402
from leanlm.model import LeanLMForCausalLM  # noqa: E402

DEVICE = torch.device(os.environ.get("LEANLM_TEST_DEVICE", "cpu"))
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
# max error / max |reference|; on a GPU float32 tl.dot runs in TF32 (10-bit mantissa)
TOL = {torch.float32: 2e-5 if DEVICE.type == "cpu" else 5e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}
MODEL_TOL = 1e-4 if DEVICE.type == "cpu" else 2e-2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


def rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype).requires_grad_()


def check_grads(out_k, out_r, inputs_k, inputs_r, dtype):
    grad = torch.randn(out_r.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    gk = torch.autograd.grad(out_k, inputs_k, grad.to(out_k.dtype))
    gr = torch.autograd.grad(out_r, inputs_r, grad)
    assert rel_err(out_k, out_r) < TOL[dtype]
    for a, b in zip(gk, gr):
        assert rel_err(a, b) < TOL[dtype], rel_err(a, b)


def as_ref(*xs):
    """float32 leaf copies: the reference runs in float32 on the same (rounded) inputs."""
    return [x.detach().float().requires_grad_() for x in xs]


# ---- banded: sliding window, compression -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,groups,dk,dv,window,q_off", [(4, 2, 24, 20, 8, 0), (3, 3, 40, 16, 16, 5),
                                                              (2, 1, 16, 16, 1 << 30, 0)])
def test_window_kernel_matches_reference(dtype, heads, groups, dk, dv, window, q_off):
    t, s = 37 - q_off, 37
    q, k, v = rand(2, heads, t, dk, dtype=dtype), rand(2, groups, s, dk, dtype=dtype, seed=1), \
        rand(2, groups, s, dv, dtype=dtype, seed=2)
    qr, kr, vr = as_ref(q, k, v)
    scale = dk ** -0.5
    out = banded.window_attention(q, k, v, q_off, 0, window, scale)
    expect = ref.window_attention(qr, kr, vr, q_off, 0, window, scale)
    check_grads(out, expect, (q, k, v), (qr, kr, vr), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block,stride", [(8, 8), (8, 4), (16, 8)])
def test_compression_kernel_matches_reference(dtype, block, stride):
    t = 45
    q = rand(2, 4, t, 24, dtype=dtype)
    kc = rand(2, 2, ref.num_compressed_blocks(t, block, stride), 24, dtype=dtype, seed=1)
    vc = rand(2, 2, kc.shape[2], 12, dtype=dtype, seed=2)
    qr, kr, vr = as_ref(q, kc, vc)
    out, lse = banded.compression_attention(q, kc, vc, 0, block, stride, 0.3)
    expect, lse_ref = ref.compression_attention(qr, kr, vr, 0, block, stride, 0.3)
    probs = ref.compression_probs(qr, kr, lse_ref, torch.arange(t, device=DEVICE), block, stride, 0.3)
    check_grads(out, expect, (q, kc, vc), (qr, kr, vr), dtype)
    # lse turns scores into the reference's probabilities; -inf for queries before the first complete block
    scores = (qr @ kr.repeat_interleave(2, 1).transpose(-1, -2)).float() * 0.3
    seen = probs.sum(-1) > 0
    assert torch.isinf(lse[~seen]).all() and (lse[~seen] < 0).all()
    p = torch.exp(scores - lse[..., None])[seen]
    torch.testing.assert_close(p * (probs[seen] > 0), probs[seen].float().detach(), atol=TOL[dtype] * 5, rtol=0)


# ---- top-n selection ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block,stride,sel_block,count,init,local", [(8, 8, 8, 4, 1, 2), (8, 4, 16, 3, 1, 1),
                                                                      (16, 8, 8, 5, 0, 2), (8, 8, 8, 12, 1, 2)])
def test_topk_kernel_selects_the_reference_blocks(block, stride, sel_block, count, init, local):
    t = 56
    q = rand(1, 4, t, 24).detach()
    kc = rand(1, 2, ref.num_compressed_blocks(t, block, stride), 24, seed=1).detach()
    pos = torch.arange(t, device=DEVICE)
    _, lse_ref = ref.compression_attention(q, kc, kc, 0, block, stride, 0.3)
    expect = ref.select_blocks(q, kc, lse_ref, pos, count, block, stride, sel_block, init, local, 0.3)
    _, lse = banded.compression_attention(q, kc, kc, 0, block, stride, 0.3)
    got = topk.select_blocks(q, kc, lse, pos, count, block, stride, sel_block, init, local, 0.3)
    assert got.dtype == torch.int32 and got.shape == expect.shape
    # same set of blocks per query and group (order is free); -1 pads where fewer blocks exist
    assert torch.equal(got.long().sort(-1).values, expect.sort(-1).values)


def test_topk_kernel_on_a_subset_of_rows():
    """Query grouping selects only at group starts: rows given with their own positions."""
    t = 64
    q = rand(1, 2, t, 16).detach()
    kc = rand(1, 1, 8, 16, seed=1).detach()
    pos = torch.arange(t, device=DEVICE)
    _, lse_ref = ref.compression_attention(q, kc, kc, 0, 8, 8, 0.25)
    _, lse = banded.compression_attention(q, kc, kc, 0, 8, 8, 0.25)
    rows = slice(3, None, 4)
    expect = ref.select_blocks(q[:, :, rows], kc, lse_ref[:, :, rows], pos[rows], 3, 8, 8, 8, 1, 1, 0.25)
    got = topk.select_blocks(q[:, :, rows], kc, lse[:, :, rows], pos[rows], 3, 8, 8, 8, 1, 1, 0.25)
    assert torch.equal(got.long().sort(-1).values, expect.sort(-1).values)


# ---- selection attention -----------------------------------------------------------------------------------------
def random_blocks(b, g, t, n, num_blocks, query_group=1, seed=0):
    """Distinct block ids per (b, g, run of query_group tokens), some -1."""
    gen = torch.Generator().manual_seed(seed)
    runs = t // query_group + 2
    idx = torch.stack([torch.randperm(num_blocks, generator=gen)[:n] for _ in range(b * g * runs)]).view(b, g, runs, n)
    idx[..., -1] = torch.where(torch.rand(b, g, runs, generator=gen) < 0.3, -1, idx[..., -1])
    return idx


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,groups,query_group,q_off,sel_block", [(4, 2, 1, 0, 8), (8, 2, 4, 0, 8),
                                                                      (8, 2, 4, 6, 16), (6, 3, 2, 3, 8)])
def test_selection_kernel_matches_reference(dtype, heads, groups, query_group, q_off, sel_block):
    s = 48
    t = s - q_off
    q = rand(1, heads, t, 24, dtype=dtype)
    k, v = rand(1, groups, s, 24, dtype=dtype, seed=1), rand(1, groups, s, 20, dtype=dtype, seed=2)
    pos = torch.arange(q_off, s, device=DEVICE)
    table = random_blocks(1, groups, s, 4, s // sel_block + 1, query_group).to(DEVICE)
    idx = table[:, :, pos // query_group]  # tokens of a query group share their blocks
    qr, kr, vr = as_ref(q, k, v)
    out = selection.selection_attention(q, k, v, idx, q_off, 0, sel_block, 0.2, query_group)
    expect = ref.selection_attention(qr, kr, vr, idx, q_off, 0, sel_block, 0.2)
    check_grads(out, expect, (q, k, v), (qr, kr, vr), dtype)


# ---- decode ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,groups,lo,hi,splits", [(4, 1, 0, 100, None), (8, 2, 37, 90, 3), (4, 4, 0, 5, 1)])
def test_latent_decode_dense_matches_sdpa(dtype, heads, groups, lo, hi, splits):
    s, dc, dr = 100, 32, 16
    ql, qr = rand(2, heads, dc, dtype=dtype).detach(), rand(2, heads, dr, dtype=dtype, seed=1).detach()
    c, kr = rand(2, groups, s, dc, dtype=dtype, seed=2).detach(), rand(2, 1, s, dr, dtype=dtype, seed=3).detach()
    out, lse = decode.latent_decode(ql, qr, c, kr, 0.2, lo, hi, splits=splits)
    q = torch.cat([ql, qr], -1)[:, :, None].float()
    k = torch.cat([c, kr.expand(-1, groups, -1, -1)], -1).float()
    mask = torch.zeros(s, dtype=torch.bool, device=DEVICE)
    mask[lo:hi] = True
    expect = F.scaled_dot_product_attention(q, k, c.float(), attn_mask=mask[None], scale=0.2, enable_gqa=True)[:, :, 0]
    assert rel_err(out, expect) < TOL[dtype]
    scores = (q @ k.repeat_interleave(heads // groups, 1).transpose(-1, -2))[:, :, 0] * 0.2
    torch.testing.assert_close(lse, torch.logsumexp(scores[..., lo:hi], -1), atol=TOL[dtype] * 10, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_latent_decode_over_selected_blocks_matches_reference(dtype):
    s, dc, dr, g, h = 100, 32, 16, 2, 8
    ql, qr = rand(2, h, dc, dtype=dtype).detach(), rand(2, h, dr, dtype=dtype, seed=1).detach()
    c, kr = rand(2, g, s, dc, dtype=dtype, seed=2).detach(), rand(2, 1, s, dr, dtype=dtype, seed=3).detach()
    blocks = random_blocks(2, g, 1, 4, 7, seed=4)[:, :, 0].to(DEVICE)  # [B, G, n], 16-token blocks, some -1
    out, _ = decode.latent_decode(ql, qr, c, kr, 0.2, blocks=blocks, block=16)
    q = torch.cat([ql, qr], -1)[:, :, None].float()
    k = torch.cat([c, kr.expand(-1, g, -1, -1)], -1).float()
    expect = ref.selection_attention(q, k, c.float(), blocks[:, :, None], s - 1, 0, 16, 0.2)[:, :, 0]
    assert rel_err(out, expect) < TOL[dtype]


def test_latent_decode_reads_strided_views_of_a_compressed_cache():
    """The compressed cache stores K̄ = [c ; k_r] per group; the kernel reads its two slices in place."""
    kc = rand(1, 2, 30, 40).detach()
    ql, qr = rand(1, 4, 32).detach(), rand(1, 4, 8, seed=1).detach()
    out, _ = decode.latent_decode(ql, qr, kc[..., :32], kc[..., 32:], 0.3)
    q = torch.cat([ql, qr], -1)[:, :, None]
    expect = F.scaled_dot_product_attention(q, kc, kc[..., :32], scale=0.3, enable_gqa=True)[:, :, 0]
    assert rel_err(out, expect) < TOL[torch.float32]


# ---- whole models: kernels vs references -------------------------------------------------------------------------
MODEL_BASE = dict(vocab_size=61, hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                  max_position_embeddings=128, nsa_window=16, nsa_select_count=3, window_cache_margin=4)
MODELS = [
    ("asa", dict(attention="asa", nsa_compress_block=8, nsa_compress_stride=8, nsa_select_block=8)),
    ("asa-q1-nsa-pattern", dict(attention="asa", nsa_compress_block=8, nsa_compress_stride=4, nsa_select_block=8,
                                nsa_query_group=1, asa_pattern="nsa")),
    ("nsa", dict(attention="nsa", nsa_compress_block=16, nsa_compress_stride=8, nsa_select_block=16)),
]


def build(extra: dict) -> LeanLMForCausalLM:
    torch.manual_seed(0)
    return LeanLMForCausalLM(LeanLMConfig(**{**MODEL_BASE, **extra})).to(DEVICE)


@pytest.mark.parametrize("name,extra", MODELS, ids=[m[0] for m in MODELS])
def test_model_forward_and_gradients_match_reference(name, extra, monkeypatch):
    ids = torch.randint(0, 61, (2, 40), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    results = {}
    for choice in ("torch", "triton"):
        monkeypatch.setenv("LEANLM_KERNELS", choice)
        model = build(extra)
        out = model(ids, labels=ids)
        out.loss.backward()
        results[choice] = (out.logits.detach(), {n: p.grad for n, p in model.named_parameters()
                                                 if p.grad is not None})
    (lt, gt), (lk, gk) = results["torch"], results["triton"]
    assert rel_err(lk, lt) < MODEL_TOL
    assert gk.keys() == gt.keys() and len(gt) > 10
    for n in gt:
        assert rel_err(gk[n], gt[n]) < 10 * MODEL_TOL, n


@pytest.mark.parametrize("name,extra", MODELS[:2], ids=[m[0] for m in MODELS[:2]])
def test_model_incremental_decoding_with_kernels_matches_full_forward(name, extra, monkeypatch):
    """Prefill with the prefill kernels, then one token at a time through the decode kernels (latent cache in
    place, top-n on device, selection over blocks) across block and window boundaries."""
    ids = torch.randint(0, 61, (1, 44), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    monkeypatch.setenv("LEANLM_KERNELS", "torch")
    model = build(extra).eval()
    with torch.no_grad():
        full = model(ids).logits
        monkeypatch.setenv("LEANLM_KERNELS", "triton")
        out = model(ids[:, :20], use_cache=True)
        cache, logits = out.past_key_values, [out.logits]
        for i in range(20, 44):
            logits.append(model(ids[:, i:i + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(logits, 1), full, atol=MODEL_TOL, rtol=MODEL_TOL)


# ---- dispatch ----------------------------------------------------------------------------------------------------
def test_dispatch_defaults_env_override_and_errors(monkeypatch):
    monkeypatch.delenv("LEANLM_KERNELS", raising=False)
    assert not use_kernels(torch.device("cpu"))  # auto: references on CPU
    assert not use_kernels(torch.device("cpu"), "torch")
    monkeypatch.setenv("LEANLM_KERNELS", "torch")
    assert not use_kernels(torch.device("cpu"), "triton")  # the environment wins over the config
    monkeypatch.setenv("LEANLM_KERNELS", "fast")
    with pytest.raises(ConfigError, match="LEANLM_KERNELS"):
        use_kernels(torch.device("cpu"))
    monkeypatch.delenv("LEANLM_KERNELS")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
        use_kernels(torch.device("cpu"), "triton")
    with pytest.raises(ConfigError, match="attention_kernels"):
        LeanLMConfig(vocab_size=61, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                     attention_kernels="cuda")


def test_kernels_before_the_first_complete_block():
    """No compressed block yet: zero compression output, lse -inf, only forced blocks selected, no launch on an
    empty tensor."""
    q = rand(1, 2, 6, 16).detach()
    empty = torch.zeros(1, 1, 0, 16, device=DEVICE)
    out, lse = banded.compression_attention(q, empty, empty, 0, 8, 8, 0.25)
    assert out.shape == (1, 2, 6, 16) and not out.any() and torch.isneginf(lse).all()
    pos = torch.arange(6, device=DEVICE)
    idx = topk.select_blocks(q, empty, lse, pos, 3, 8, 8, 8, 1, 2, 0.25)
    assert idx.sort(-1).values.tolist() == [[[[-1, -1, 0]] * 6]]
    o, lse1 = decode.latent_decode(q[:, :, 0], q[:, :, 0, :8], empty, empty[..., :8], 0.25)
    assert not o.any() and torch.isneginf(lse1).all()
