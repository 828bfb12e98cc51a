"""Bad configs fail early with one clear message naming the field and the fix."""

from __future__ import annotations

import pytest

from leanlm import ConfigError, LeanLMConfig
from leanlm.runconfig import apply_overrides, build_run_config, load_run_config


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_attention_heads=6, num_key_value_heads=4), "num_key_value_heads"),
    (dict(hidden_size=60, num_attention_heads=4, head_dim=15), "head_dim"),
    (dict(attention="flash-magic"), "attention"),
    (dict(attention=["gqa", "gqa", "gqa"], num_hidden_layers=2), "attention"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(rope_theta=-1.0), "rope_theta"),
    (dict(attention_dropout=1.5), "attention_dropout"),
    (dict(hidden_act="gelu"), "hidden_act"),
])
def test_bad_model_config_names_field(kwargs, field):
    with pytest.raises(ConfigError) as err:
        LeanLMConfig(**kwargs)
    assert err.value.field == field
    assert "Fix:" in str(err.value)


def test_per_layer_attention_list_is_accepted():
    cfg = LeanLMConfig(num_hidden_layers=3, attention=["gqa", "gqa", "gqa"])
    assert cfg.layer_attention == ["gqa"] * 3


@pytest.mark.parametrize("overrides, field", [
    (["train.lr=-0.1"], "train.lr"),
    (["train.no_such_key=1"], "train.no_such_key"),
    (["model.n_heads=4"], "model.n_heads"),
    (["bogus.key=1"], "bogus"),
    (["train.batch_size=abc"], "train.batch_size"),
    (["data.seq_len=0"], "data.seq_len"),
    (["train.dtype=fp8"], "train.dtype"),
])
def test_bad_overrides_name_the_key(overrides, field):
    with pytest.raises(ConfigError) as err:
        load_run_config("tiny", overrides)
    assert err.value.field == field


def test_override_without_section_is_rejected():
    with pytest.raises(ConfigError, match="name their section"):
        apply_overrides({}, ["lr=1e-3"])


def test_overrides_are_applied_and_typed():
    run = load_run_config("tiny", ["train.lr=5e-4", "model.num_hidden_layers=2", "train.fsdp=true"])
    assert run.train.lr == 5e-4 and isinstance(run.train.lr, float)
    assert run.model_config().num_hidden_layers == 2 and run.train.fsdp is True


def test_shipped_configs_are_valid():
    for name in ("tiny", "small", "125m", "350m"):
        build_run_config(load_run_config(name).to_dict())
