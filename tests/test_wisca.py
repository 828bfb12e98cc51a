"""WISCA: every transform keeps the model's outputs (float64 and float32), balances the norms it should, finds its
modules by structure, handles optimizer state as documented, and plugs into training and the CLI."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from leanlm import LeanLMConfig, LeanLMForCausalLM
from leanlm.wisca import WiscaConfig, find_sites, gain_offset, wisca_transform

VOCAB = 61


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Random weights everywhere (norm gains, biases, LoRA B included), so no invariance holds by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)
    return model


def rel_change(model, fn, dtype=torch.float64, seed=0) -> float:
    model = model.to(dtype).eval()
    x = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        before = model(input_ids=x).logits
        fn(model)
        after = model(input_ids=x).logits
    return float((after - before).abs().max() / before.abs().max())


def leanlm_model(heads=8, kv=2, head_dim=8, bias=False, tied=True, seed=0):
    torch.manual_seed(seed)
    cfg = LeanLMConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=heads,
                       num_key_value_heads=kv, head_dim=head_dim, attention_bias=bias, tie_word_embeddings=tied)
    return perturb(LeanLMForCausalLM(cfg), seed)


ALL_MODES = [("tensor", "tensor"), ("group", "group"), ("channel", "channel"), ("tensor", "channel"),
             ("channel", "none"), ("none", "group")]


@settings(max_examples=25, deadline=None)
@given(group=st.sampled_from([1, 2, 4, 8]), kv=st.sampled_from([1, 2]), half_d=st.sampled_from([2, 4, 8]),
       bias=st.booleans(), tied=st.booleans(), mode=st.sampled_from(ALL_MODES), norm=st.sampled_from(["l1", "l2"]),
       ffn=st.booleans(), seed=st.integers(0, 1000))
def test_leanlm_invariance_float64_and_float32(group, kv, half_d, bias, tied, mode, norm, ffn, seed):
    cfg = WiscaConfig(qk=mode[0], vo=mode[1], norm=norm, ffn=ffn)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        model = leanlm_model(heads=group * kv, kv=kv, head_dim=2 * half_d, bias=bias, tied=tied, seed=seed)
        assert rel_change(model, lambda m: wisca_transform(m, cfg), dtype, seed) < tol


def test_tensor_mode_balances_norms_and_matches_gqa_prediction():
    model = LeanLMForCausalLM(LeanLMConfig(vocab_size=VOCAB, hidden_size=96, num_hidden_layers=1,
                                           num_attention_heads=12, num_key_value_heads=4)).double()
    report = wisca_transform(model, WiscaConfig())
    row = report.layers[0]
    # At an equal-std init |Wq|_1 / |Wk|_1 ~= g = 3, so s ~= 1/sqrt(3) and t ~= sqrt(3).
    assert row["q_before"] / row["k_before"] == pytest.approx(3.0, rel=0.05)
    assert row["s_mean"] == pytest.approx(3 ** -0.5, rel=0.03) and row["t_mean"] == pytest.approx(3 ** 0.5, rel=0.03)
    assert row["q_after"] == pytest.approx(row["k_after"], rel=1e-12)
    assert row["v_after"] == pytest.approx(row["o_after"], rel=1e-12)
    # The balanced point minimises |Wq| + |Wk| over the scaling orbit.
    assert row["q_after"] + row["k_after"] < row["q_before"] + row["k_before"]
    again = wisca_transform(model, WiscaConfig())
    assert again.layers[0]["s_mean"] == pytest.approx(1.0, abs=1e-12)


def test_channel_mode_ties_rope_pairs():
    model = leanlm_model(heads=4, kv=2, head_dim=8).double()
    q_before = model.model.layers[0].self_attn.q_proj.weight.clone()
    wisca_transform(model, WiscaConfig(qk="channel", vo="none"))
    ratio = (model.model.layers[0].self_attn.q_proj.weight / q_before)[:, 0].view(4, 8)
    torch.testing.assert_close(ratio[:, :4], ratio[:, 4:])  # channel c and c + d/2 share one factor
    torch.testing.assert_close(ratio[0], ratio[1])  # query heads of one KV group share it too


def test_untied_rope_channels_would_break_the_function():
    """The check that makes the RoPE tie necessary: scaling q/k channels without the pair tie changes outputs."""
    model = leanlm_model(heads=4, kv=2, head_dim=8).double()

    def untied(m):
        attn = m.model.layers[0].self_attn
        f = torch.linspace(0.5, 2.0, 8, dtype=torch.float64).repeat(2)
        attn.k_proj.weight.mul_(f[:, None])
        attn.q_proj.weight.div_(f.repeat(2)[:, None])

    assert rel_change(model, untied) > 1e-4


# ----------------------------------------------------------------------------------- Hugging Face families
def hf_model(family: str, kv: int, bias: bool = False):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=kv, max_position_embeddings=64)
    torch.manual_seed(0)
    if family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common, attention_bias=bias))
    elif family == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=8))
    elif family == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    elif family == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, head_dim=8))
    elif family == "gemma":
        model = tf.GemmaForCausalLM(tf.GemmaConfig(**common, head_dim=8))
    elif family == "gemma3":
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**common, head_dim=8, sliding_window=8))
    else:
        raise ValueError(family)
    model.config._attn_implementation = "eager"
    return perturb(model)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kv", [1, 2, 4])
@pytest.mark.parametrize("mode", ["tensor", "channel"])
def test_hf_families_invariance(family, kv, mode):
    cfg = WiscaConfig(qk=mode, vo=mode, ffn=True)
    # Gemma's RMSNorm computes in float32 even in a float64 model, which bounds its float64 agreement at ~1e-7.
    tol64 = 1e-6 if family.startswith("gemma") else 1e-12
    for dtype, tol in ((torch.float64, tol64), (torch.float32, 1e-5)):
        model = hf_model(family, kv, bias=family == "llama")
        sites, _, unsupported = find_sites(model)
        assert len(sites) == 2 and not unsupported
        assert rel_change(model, lambda m: wisca_transform(m, cfg), dtype) < tol


def test_qk_norm_models_balance_gains_with_detected_offset():
    qwen3, gemma3 = hf_model("qwen3", 2), hf_model("gemma3", 2)
    assert gain_offset(qwen3.model.layers[0].self_attn.q_norm) == 0.0
    assert gain_offset(gemma3.model.layers[0].self_attn.q_norm) == 1.0
    report = wisca_transform(gemma3.double(), WiscaConfig(vo="none"))
    row = report.layers[0]
    assert row["q_after"] == pytest.approx(row["k_after"], rel=1e-12) and row["q_before"] != pytest.approx(
        row["k_before"], rel=1e-3)


@pytest.mark.parametrize("lora_mode", ["effective", "factors", "both"])
def test_peft_lora_invariance_and_balance(lora_mode):
    from peft import LoraConfig, get_peft_model

    base = hf_model("llama", 2)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                                               "o_proj", "up_proj"]))
    perturb(model, seed=1, scale=0.1)  # non-zero B, as after some training
    cfg = WiscaConfig(lora=lora_mode)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        assert rel_change(model, lambda m: wisca_transform(m, cfg), dtype) < tol
    if lora_mode != "effective":
        lin = model.base_model.model.model.layers[0].self_attn.q_proj
        a, b = lin.lora_A["default"].weight, lin.lora_B["default"].weight
        assert float(a.detach().abs().sum()) == pytest.approx(float(b.detach().abs().sum()), rel=1e-6)


def test_fresh_lora_factors_are_left_alone():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(hf_model("llama", 2), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    a = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.clone()
    wisca_transform(model, WiscaConfig(lora="factors"))
    assert torch.equal(a, model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight)


def test_unsupported_attention_is_listed():
    class FusedAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(32, 96)
            self.out = torch.nn.Linear(32, 32)

    model = leanlm_model()
    model.model.layers[1].extra_attn = FusedAttention()
    sites, _, unsupported = find_sites(model)
    assert len(sites) == 2
    assert [u[0] for u in unsupported] == ["model.layers.1.extra_attn"]
    assert "unsupported: model.layers.1.extra_attn" in wisca_transform(model).table()


def test_structural_fallback_without_known_names():
    class Attn(torch.nn.Module):  # q/k/v/o under unfamiliar names, registered in that order
        def __init__(self, src):
            super().__init__()
            self.a, self.b, self.c, self.d = src.q_proj, src.k_proj, src.v_proj, src.o_proj
            self.inner = src  # forward delegates to the original module, which holds the same Linear objects

        def forward(self, *args):
            return self.inner(*args)

    holder = leanlm_model()
    holder.model.layers[0].self_attn = Attn(holder.model.layers[0].self_attn)
    names = [s.name for s in find_sites(holder)[0]]
    assert names == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert rel_change(holder, lambda m: wisca_transform(m)) < 1e-12


@pytest.mark.parametrize("mode", ["keep", "reset", "rescale"])
def test_optimizer_state_modes(mode):
    model = leanlm_model(heads=8, kv=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, VOCAB, (2, 9))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    q = model.model.layers[0].self_attn.q_proj.weight
    m_before = opt.state[q]["exp_avg"].clone()
    v_before = opt.state[q]["exp_avg_sq"].clone()
    report = wisca_transform(model, WiscaConfig(optimizer_state=mode), optimizer=opt)
    s = report.layers[0]["s_mean"]
    if mode == "keep":
        assert torch.equal(opt.state[q]["exp_avg"], m_before)
    elif mode == "reset":
        assert q not in opt.state
    else:
        torch.testing.assert_close(opt.state[q]["exp_avg"], m_before / s, rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(opt.state[q]["exp_avg_sq"], v_before / s**2, rtol=1e-5, atol=1e-15)


# ----------------------------------------------------------------------------------------------- training
def test_training_callback_schedule_and_invariance(tiny_config):
    from leanlm.runconfig import build_run_config
    from leanlm.train import Callback, Trainer

    class Probe(Callback):  # records validation loss at every 4th step end
        def __init__(self):
            self.loss = {}

        def on_step_end(self, trainer, step):
            if step % 4 == 0:
                self.loss[step] = trainer.evaluate()["val_loss"]

    raw = tiny_config(max_steps=9, ckpt_every=0, eval_every=0)
    raw["wisca"] = {"every": 4}
    before, after = Probe(), Probe()
    run = build_run_config(raw)
    trainer = Trainer(run, callbacks=[before, *run.callbacks()])
    wisca_cb = trainer.callbacks[-1]
    trainer.callbacks.append(after)  # runs after WISCA's transition
    trainer.fit()
    assert [r["step"] for r in wisca_cb.log] == [0, 4, 8]
    assert [r["step"] for r in trainer.history if "wisca_seconds" in r] == [0, 4, 8]
    assert sorted(before.loss) == sorted(after.loss) == [4, 8]
    for step in (4, 8):  # the transition did not change the function
        assert after.loss[step] == pytest.approx(before.loss[step], rel=1e-6)
    attn = trainer.model.model.layers[0].self_attn
    ratio = float(attn.q_proj.weight.abs().sum() / attn.k_proj.weight.abs().sum())
    assert 0.8 < ratio < 1.25  # balanced at step 8, one optimizer step ago


def test_transition_inside_training_preserves_validation_loss(tiny_config):
    from leanlm.runconfig import build_run_config
    from leanlm.train import Trainer

    trainer = Trainer(build_run_config(tiny_config(max_steps=6, ckpt_every=0, eval_every=0)))
    trainer.fit()
    before = trainer.evaluate()["val_loss"]
    wisca_transform(trainer.model, WiscaConfig(), optimizer=trainer.optimizer)
    assert trainer.evaluate()["val_loss"] == pytest.approx(before, rel=1e-6)


def test_lr_control_sets_per_tensor_learning_rates(tiny_config):
    from leanlm.runconfig import build_run_config
    from leanlm.train import Trainer

    raw = tiny_config(max_steps=2, ckpt_every=0, eval_every=0, warmup_steps=0)
    raw["wisca"] = {"every": 100, "apply": "lr"}
    run = build_run_config(raw)
    trainer = Trainer(run, callbacks=run.callbacks())
    q_before = trainer.model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    trainer.callbacks[-1].on_train_start(trainer)
    attn = trainer.model.model.layers[0].self_attn
    assert torch.equal(attn.q_proj.weight, q_before)  # weights untouched
    lrs = {id(g["params"][0]): g["lr"] for g in trainer.optimizer.param_groups if len(g["params"]) == 1}
    s = (attn.k_proj.weight.abs().sum() / attn.q_proj.weight.abs().sum()).sqrt().item()
    assert lrs[id(attn.q_proj.weight)] == pytest.approx(trainer.cfg.lr / s, rel=1e-6)
    assert lrs[id(attn.k_proj.weight)] == pytest.approx(trainer.cfg.lr * s, rel=1e-6)


def test_wisca_with_fsdp_is_refused(tiny_config):
    from leanlm import ConfigError
    from leanlm.runconfig import build_run_config
    from leanlm.train import Trainer

    raw = tiny_config(fsdp=True)
    raw["wisca"] = {"every": 10}
    with pytest.raises(ConfigError, match="DDP"):
        Trainer(build_run_config(raw))


def test_bad_wisca_values():
    from leanlm import ConfigError

    for kw, field in ((dict(qk="row"), "wisca.qk"), (dict(norm="linf"), "wisca.norm"), (dict(every=-1), "wisca.every"),
                      (dict(optimizer_state="zero"), "wisca.optimizer_state")):
        with pytest.raises(ConfigError) as err:
            WiscaConfig(**kw).check()
        assert err.value.field == field


# -- latent and sparse attention (extension): MLA/GLA/ASA via the latent rule, NSA like GQA ---------------------------
SPARSE = dict(nsa_window=16, nsa_select_count=4, nsa_compress_block=8, nsa_compress_stride=8, nsa_select_block=8)
LATENT_KINDS = [("mla", {}), ("mla", {"q_lora_rank": 24}), ("gla", {}), ("nsa", {}), ("asa", {}),
                ("asa", {"nsa_compressor": "mlp"}), ("asa", {"asa_pattern": "nsa", "nsa_query_group": 1})]


@pytest.mark.parametrize("kind,extra", LATENT_KINDS, ids=[f"{k}-{'-'.join(map(str, e.values()))}" for k, e in
                                                          LATENT_KINDS])
@pytest.mark.parametrize("mode", ["tensor", "group", "channel"])
def test_latent_and_sparse_attention_invariance_and_balance(kind, extra, mode):
    torch.manual_seed(0)
    cfg = LeanLMConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=8,
                       num_key_value_heads=2, head_dim=8, max_position_embeddings=64, attention=kind,
                       **{**SPARSE, **extra})
    model = perturb(LeanLMForCausalLM(cfg), 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or "q_b_proj" in name:
                p.mul_(4.0)  # make the pairs clearly unbalanced
    reports = []
    x = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(2))
    model = model.double().eval()
    with torch.no_grad():
        before = model(input_ids=x).logits
        reports.append(wisca_transform(model, WiscaConfig(qk=mode, vo=mode)))
        after = model(input_ids=x).logits
    assert float((after - before).abs().max() / before.abs().max()) < 1e-12
    report = reports[0]
    assert len(report.layers) == 2 and not report.unsupported
    for row in report.layers:
        assert row["q_before"] / row["k_before"] > 1.5
        assert row["v_after"] == pytest.approx(row["o_after"], rel=1e-9)
        if extra.get("nsa_compressor") != "mlp":
            assert row["q_after"] == pytest.approx(row["k_after"], rel=1e-9) or mode != "tensor"


def test_nsa_with_mlp_compressor_is_listed_as_unsupported():
    cfg = LeanLMConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=8,
                       num_key_value_heads=2, max_position_embeddings=64, attention="nsa", nsa_compressor="mlp",
                       **SPARSE)
    sites, _, unsupported = find_sites(LeanLMForCausalLM(cfg))
    assert sites == [] and [u[0] for u in unsupported] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]


def test_lr_control_refuses_latent_attention():
    from leanlm import ConfigError
    from leanlm.wisca import control_multipliers

    cfg = LeanLMConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=8,
                       num_key_value_heads=2, max_position_embeddings=64, attention="asa", **SPARSE)
    with pytest.raises(ConfigError, match="wisca.apply"):
        control_multipliers(LeanLMForCausalLM(cfg), WiscaConfig(apply="lr"))


def test_trainer_takes_the_run_configs_callbacks_unless_given_others(tiny_config):
    from leanlm.runconfig import build_run_config
    from leanlm.train import Trainer
    from leanlm.wisca import WiscaCallback

    raw = tiny_config(max_steps=2, ckpt_every=0, eval_every=0)
    raw["wisca"] = {"every": 1}
    run = build_run_config(raw)
    assert [type(cb) for cb in Trainer(run).callbacks] == [WiscaCallback]  # the trainer itself names no WISCA
    assert Trainer(run, callbacks=[]).callbacks == []
    raw["wisca"] = {"every": 0}
    assert Trainer(build_run_config(raw)).callbacks == []
