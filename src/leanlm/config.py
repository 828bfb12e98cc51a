"""Model configuration: Hugging Face Llama field names plus a per-layer attention choice.

`LeanLMConfig` is a `transformers.PreTrainedConfig`, so `save_pretrained`, `from_pretrained`, `AutoConfig`, peft
and lm-eval read it as they read any Llama config. The only new field is `attention`: either one attention kind
for every layer (`"gqa"`) or an explicit list with one kind per layer, from `ATTENTION_KINDS`; `leanlm.model`
builds each layer from `leanlm.attention.ATTENTION_CLASSES`. The config checks every field a layer kind reads
here, so this module depends on nothing above it.

Every value is checked when the config is built; a bad value raises `ConfigError` naming the field and the fix.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import GenerationConfig, PreTrainedConfig

from leanlm.errors import ConfigError

ATTENTION_KINDS = ("gqa", "mla", "gla", "nsa", "asa")  # each has its class in `leanlm.attention.<kind>`
KERNEL_CHOICES = ("auto", "triton", "torch")  # `attention_kernels`, see `leanlm.kernels.dispatch`
ASA_ROLES = ("local", "global", "both")
ASA_PATTERNS = ("alternate", "alternate_global_first", "nsa")


class LeanLMConfig(PreTrainedConfig):
    r"""Configuration of a leanlm decoder-only language model.

    Field names follow `transformers.LlamaConfig`. Extra fields:

    attention (`str` or `list[str]`, defaults to `"gqa"`):
        Attention kind of every layer, or a list with one kind per layer (length `num_hidden_layers`):
        `gqa`, `mla`, `gla`, `nsa` or `asa`.

    Latent attention (`mla`, `gla` and ASA's layers) uses DeepSeek-V3's field names where they exist:
    `kv_lora_rank` (MLA latent width d_c, default 4 * head_dim), `q_lora_rank` (optional query compression),
    `qk_rope_head_dim` (decoupled RoPE width d_r, default head_dim / 2), `qk_nope_head_dim` (default head_dim),
    `v_head_dim` (default head_dim). New: `gla_latent_heads` (g, default num_key_value_heads) and
    `gla_kv_lora_rank` (total GLA latent width, split evenly over the g latent heads; default g * 2 * head_dim),
    `latent_absorb` (`auto`: weight-absorbed attention over the latent cache when decoding, expanded keys/values
    for training and prefill; `always` / `never` force one path; both give the same result).

    Sparse attention (`nsa`, and ASA's global layers): `nsa_compress_block` l, `nsa_compress_stride` d,
    `nsa_select_block` l', `nsa_select_count` n (an int, or one per layer), `nsa_init_blocks` and
    `nsa_local_blocks` (always-selected first / most recent blocks, counted in n), `nsa_window` w,
    `nsa_compressor` (`mean` pooling or the paper's `mlp` with intra-block position embedding),
    `nsa_query_group` Q (selection computed once per Q consecutive tokens from the first of them; 1 = exact NSA),
    `nsa_gates` (per-head sigmoid branch gates). Unset block sizes take the NSA paper's values (32/16/64) for `nsa`
    and ASA's reported 16-token blocks for `asa`; `window_cache_margin` is how many tokens beyond the window a
    sliding-window cache keeps so that speculative decoding can roll back.

    ASA: `asa_pattern` is `alternate` (layer 0 local, then strict 1:1 alternation; the paper's ambiguity A1),
    `alternate_global_first`, `nsa` (every layer has all three branches on GLA: the fixed-pattern ablation), or an
    explicit list of `local` / `global` / `both` per layer. `asa_local_gate` adds a sigmoid output gate per head in
    local layers.

    `attention_kernels` (`auto`, `triton`, `torch`): whether NSA/ASA/MLA/GLA layers run the Triton kernels of
    `leanlm.kernels` (auto = on CUDA when Triton is installed) or the PyTorch references; the environment variable
    LEANLM_KERNELS overrides it.
    """

    model_type = "leanlm"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int | None = None
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 1024
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 0
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    attention: str | list[str] = "gqa"
    # latent attention (MLA / GLA)
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    qk_nope_head_dim: int | None = None
    v_head_dim: int | None = None
    gla_latent_heads: int | None = None
    gla_kv_lora_rank: int | None = None
    latent_absorb: str = "auto"
    # sparse attention (NSA / ASA global layers)
    nsa_compress_block: int | None = None
    nsa_compress_stride: int | None = None
    nsa_select_block: int | None = None
    nsa_select_count: int | list[int] = 16
    nsa_init_blocks: int = 1
    nsa_local_blocks: int = 2
    nsa_window: int = 512
    nsa_compressor: str = "mean"
    nsa_query_group: int | None = None
    nsa_gates: bool = True
    window_cache_margin: int = 64
    attention_kernels: str = "auto"
    # ASA
    asa_pattern: str | list[str] = "alternate"
    asa_local_gate: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        self._check_types(kwargs)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads and self.hidden_size:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None and self.hidden_size:
            # SwiGLU sizing of Llama: 8/3 of the hidden size, rounded up to a multiple of 64.
            self.intermediate_size = 64 * ((8 * self.hidden_size // 3 + 63) // 64)
        hd = self.head_dim
        if hd:
            self.kv_lora_rank = 4 * hd if self.kv_lora_rank is None else self.kv_lora_rank
            self.qk_rope_head_dim = max(2, hd // 2) if self.qk_rope_head_dim is None else self.qk_rope_head_dim
            self.qk_nope_head_dim = hd if self.qk_nope_head_dim is None else self.qk_nope_head_dim
            self.v_head_dim = hd if self.v_head_dim is None else self.v_head_dim
            if self.gla_latent_heads is None:
                self.gla_latent_heads = self.num_key_value_heads
            if self.gla_kv_lora_rank is None and self.gla_latent_heads:
                self.gla_kv_lora_rank = self.gla_latent_heads * 2 * hd
        # Block sizes: ASA's reported 16-token blocks (and 4-token query groups) when any layer is ASA, else NSA's.
        asa = "asa" in (self.attention if isinstance(self.attention, list) else [self.attention])
        for name, nsa_default, asa_default in (("nsa_compress_block", 32, 16), ("nsa_compress_stride", 16, 16),
                                               ("nsa_select_block", 64, 16), ("nsa_query_group", 1, 4)):
            if getattr(self, name) is None:
                setattr(self, name, asa_default if asa else nsa_default)
        super().__post_init__(**kwargs)
        self.check()

    def select_count(self, layer_idx: int) -> int:
        """n, the number of selected blocks of layer `layer_idx` (`nsa_select_count` may be per layer)."""
        n = self.nsa_select_count
        return n[layer_idx] if isinstance(n, list) else n

    def asa_role(self, layer_idx: int) -> str:
        """`local`, `global` or `both`: what an ASA layer at `layer_idx` computes under `asa_pattern`."""
        p = self.asa_pattern
        if isinstance(p, list):
            return p[layer_idx]
        if p == "nsa":
            return "both"
        first, second = ("global", "local") if p == "alternate_global_first" else ("local", "global")
        return first if layer_idx % 2 == 0 else second

    # ------------------------------------------------------------------------------------------------------------
    @property
    def layer_attention(self) -> list[str]:
        """The attention kind of each layer, resolved to a list of length `num_hidden_layers`."""
        if isinstance(self.attention, str):
            return [self.attention] * self.num_hidden_layers
        return list(self.attention)

    def _check_types(self, extra: dict[str, Any]) -> None:
        """Types of the own fields (before anything is derived from them) and no unknown keywords."""
        for name, annotation in LeanLMConfig.__annotations__.items():
            value = getattr(self, name)
            if not _matches(value, annotation):
                raise ConfigError(name, f"must be {annotation}, got {value!r}", f"give {name} a value of that type")
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(name, f"must be a finite number, got {value!r}", f"give {name} a finite value")
        unknown = sorted(k for k in extra if k not in _HF_KWARGS and not k.startswith("_"))
        if unknown:
            raise ConfigError(unknown[0], "is not a LeanLMConfig field",
                              f"use one of the fields listed in LeanLMConfig's docstring (e.g. hidden_size); "
                              f"unknown: {', '.join(unknown[:5])}")

    def check(self) -> None:
        """Validate every field; raise `ConfigError` naming the first bad field and its fix."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(name, f"must be a positive integer, got {value!r}", f"set {name} to an integer > 0")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ConfigError(
                "num_key_value_heads",
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_key_value_heads={self.num_key_value_heads}",
                "choose num_key_value_heads as a divisor of num_attention_heads",
            )
        if self.head_dim % 2 != 0:
            raise ConfigError("head_dim", f"RoPE rotates channel pairs, so head_dim must be even, got {self.head_dim}",
                              "choose an even head_dim (or a hidden_size / num_attention_heads that is even)")
        if not self.initializer_range >= 0:
            raise ConfigError("initializer_range", f"is a standard deviation, must be >= 0, got "
                              f"{self.initializer_range!r}", "use e.g. 0.02")
        if not self.rope_theta or self.rope_theta <= 0:
            raise ConfigError("rope_theta", f"must be > 0, got {self.rope_theta!r}", "use e.g. 10000.0")
        if not self.rms_norm_eps or self.rms_norm_eps <= 0:
            raise ConfigError("rms_norm_eps", f"must be > 0, got {self.rms_norm_eps!r}", "use e.g. 1e-5")
        if not 0.0 <= float(self.attention_dropout) < 1.0:
            raise ConfigError("attention_dropout", f"must be in [0, 1), got {self.attention_dropout!r}", "use 0.0")
        if self.hidden_act != "silu":
            raise ConfigError("hidden_act", f"only 'silu' (SwiGLU) is supported, got {self.hidden_act!r}",
                              "set hidden_act: silu")
        if self.attention_kernels not in KERNEL_CHOICES:
            raise ConfigError("attention_kernels", f"unknown choice {self.attention_kernels!r}",
                              f"use one of {', '.join(KERNEL_CHOICES)}")
        kinds = self.layer_attention
        if not isinstance(self.attention, str) and len(kinds) != self.num_hidden_layers:
            raise ConfigError("attention", f"lists {len(kinds)} layer kinds for num_hidden_layers="
                              f"{self.num_hidden_layers}", "give one kind per layer, or a single kind for all layers")
        for i, kind in enumerate(kinds):
            if kind not in ATTENTION_KINDS:
                where = "" if isinstance(self.attention, str) else f" (layer {i})"
                raise ConfigError("attention", f"unknown attention kind {kind!r}{where}",
                                  f"use one of {sorted(ATTENTION_KINDS)}")
            self._check_layer(kind, i)

    def _check_layer(self, kind: str, layer_idx: int) -> None:
        """The fields an attention kind reads, for layer `layer_idx` (GQA reads only the common ones)."""
        if kind == "asa":
            p = self.asa_pattern
            if isinstance(p, list):
                if len(p) != self.num_hidden_layers or any(r not in ASA_ROLES for r in p):
                    raise ConfigError("asa_pattern", f"an explicit pattern needs {self.num_hidden_layers} entries "
                                      f"from {list(ASA_ROLES)}, got {p!r}", "or use one of " + ", ".join(ASA_PATTERNS))
            elif p not in ASA_PATTERNS:
                raise ConfigError("asa_pattern", f"unknown pattern {p!r}", "use one of " + ", ".join(ASA_PATTERNS) +
                                  ", or a list with local/global/both per layer")
        if kind in ("nsa", "asa"):
            self._check_sparse_fields(layer_idx)
        if kind == "mla" or (kind == "asa" and self.asa_role(layer_idx) == "local"):
            self._check_latent_fields(1, self.kv_lora_rank or 0, "kv_lora_rank", "kv_lora_rank")
        elif kind in ("gla", "asa"):
            self._check_latent_fields(self.gla_latent_heads or 0, self.gla_kv_lora_rank or 0, "gla_kv_lora_rank",
                                      "gla_latent_heads")

    def _check_latent_fields(self, latent_heads: int, latent_dim: int, rank_field: str, heads_field: str) -> None:
        """Fields of MLA/GLA layers (and ASA's, which are MLA when local and GLA when global)."""
        for name in ("qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", rank_field, heads_field):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(name, f"must be a positive integer, got {v!r}", f"set {name} to an integer > 0")
        if self.qk_rope_head_dim % 2:
            raise ConfigError("qk_rope_head_dim", f"RoPE rotates channel pairs, got odd {self.qk_rope_head_dim}",
                              "use an even qk_rope_head_dim")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            raise ConfigError("q_lora_rank", f"must be a positive integer or null, got {self.q_lora_rank!r}",
                              "set q_lora_rank: null for an uncompressed query")
        if latent_dim % latent_heads:
            raise ConfigError(rank_field, f"latent width {latent_dim} is not divisible by {heads_field}={latent_heads}",
                              f"choose {rank_field} as a multiple of {heads_field}")
        if self.num_attention_heads % latent_heads:
            raise ConfigError(heads_field, f"num_attention_heads={self.num_attention_heads} is not divisible by "
                              f"{heads_field}={latent_heads}", "choose a divisor of num_attention_heads")
        if self.latent_absorb not in ("auto", "always", "never"):
            raise ConfigError("latent_absorb", f"unknown value {self.latent_absorb!r}", "use auto, always or never")

    def _check_sparse_fields(self, layer_idx: int) -> None:
        """Fields of NSA layers and ASA's global layers."""
        l, d, ls = self.nsa_compress_block, self.nsa_compress_stride, self.nsa_select_block
        for name in ("nsa_compress_block", "nsa_compress_stride", "nsa_select_block", "nsa_window", "nsa_query_group"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(name, f"must be a positive integer, got {v!r}", f"set {name} to an integer > 0")
        n = self.nsa_select_count
        if isinstance(n, list) and len(n) != self.num_hidden_layers:
            raise ConfigError("nsa_select_count", f"lists {len(n)} counts for {self.num_hidden_layers} layers",
                              "give one count per layer, or a single count")
        n = self.select_count(layer_idx)
        if not isinstance(n, int) or n <= 0:
            raise ConfigError("nsa_select_count", f"must be a positive integer, got {n!r}", "use e.g. 16")
        if l % d or ls % d:
            raise ConfigError("nsa_compress_stride", f"stride d={d} must divide the compression block l={l} and the "
                              f"selection block l'={ls} (NSA's d | l, d | l')", "use e.g. l=32, d=16, l'=64")
        if self.nsa_window % ls:
            raise ConfigError("nsa_window", f"window {self.nsa_window} is not a multiple of the selection block "
                              f"nsa_select_block={ls}",
                              f"use a multiple of {ls}, e.g. {max(ls, self.nsa_window // ls * ls)}")
        blocks = math.ceil(self.max_position_embeddings / ls)
        if n > blocks:
            raise ConfigError("nsa_select_count", f"top-n={n} (layer {layer_idx}) is more than the {blocks} blocks of "
                              f"{ls} tokens at the configured context max_position_embeddings="
                              f"{self.max_position_embeddings}", f"use nsa_select_count <= {blocks}")
        if self.nsa_init_blocks < 0:
            raise ConfigError("nsa_init_blocks",
                              f"must be >= 0 (always-selected first blocks), got {self.nsa_init_blocks}",
                              "use e.g. nsa_init_blocks: 1")
        if self.nsa_local_blocks < 1:
            raise ConfigError("nsa_local_blocks", f"must be >= 1 (the current block is always selected), got "
                              f"{self.nsa_local_blocks}", "use e.g. nsa_local_blocks: 2")
        if self.nsa_init_blocks + self.nsa_local_blocks > n:
            raise ConfigError("nsa_select_count", f"n={n} (layer {layer_idx}) must hold the forced init "
                              f"({self.nsa_init_blocks}) + local ({self.nsa_local_blocks}) blocks",
                              f"use nsa_select_count >= {self.nsa_init_blocks + self.nsa_local_blocks}")
        if ls % self.nsa_query_group:
            raise ConfigError("nsa_query_group", f"query group {self.nsa_query_group} must divide the selection block "
                              f"{ls} (a group must not straddle a block boundary)", "use 1, 2, 4 or 8")
        if self.nsa_compressor not in ("mean", "mlp"):
            raise ConfigError("nsa_compressor", f"unknown compressor {self.nsa_compressor!r}", "use mean or mlp")
        if not isinstance(self.window_cache_margin, int) or self.window_cache_margin < 0:
            raise ConfigError("window_cache_margin", f"must be an integer >= 0, got {self.window_cache_margin!r}",
                              "use e.g. 64")


# Keywords a config may carry besides its own fields: what `PreTrainedConfig` itself consumes (from a config.json
# written by any transformers version) and generation parameters, which it drops.
_HF_KWARGS = frozenset({
    "model_type", "torch_dtype", "num_labels", "rope_scaling", "rope_parameters", "name_or_path", "output_attentions",
    "attn_implementation", "experts_implementation", "per_layer_config", "layer_types", "use_return_dict",
    "tie_encoder_decoder", "is_decoder", "add_cross_attention", "cross_attention_hidden_size", "finetuning_task",
    "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params", "torchscript",
    "pruned_heads", "tf_legacy_loss", "use_bfloat16", "output_scores", "return_dict_in_generate",
}) | frozenset(GenerationConfig._get_default_generation_params())


def _matches(value: Any, annotation: str) -> bool:
    """Whether `value` fits a field annotation written as a union of int, float, bool, str, None, list[int] and
    list[str] (the only forms LeanLMConfig uses). Booleans are not integers here, integers are floats."""
    for part in (p.strip() for p in annotation.split("|")):
        if part == "None" and value is None:
            return True
        if part == "bool" and isinstance(value, bool):
            return True
        if part == "int" and isinstance(value, int) and not isinstance(value, bool):
            return True
        if part == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if part == "str" and isinstance(value, str):
            return True
        if part.startswith("list[") and isinstance(value, (list, tuple)):
            inner = part[5:-1]
            if all(_matches(v, inner) for v in value):
                return True
    return False
