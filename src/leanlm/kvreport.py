"""KV-cache accounting: exact bytes per token and per sequence of a config, and of the same model with other
attention kinds (`leanlm kv-report`).

Numbers come from each kind's `cache_bytes(config, layer, context)`, which tests check against the bytes a real
`LeanCache` holds after decoding (`LayerState.nbytes`). They count what the cache stores for one sequence: keys and
values (GQA/NSA), latents and RoPE keys (MLA/GLA/ASA), compressed blocks, and the block choices kept for query
groups; sliding-window layers keep `nsa_window - 1 + window_cache_margin` tokens. Buffer capacity reserved beyond
the stored length is not counted.
"""

from __future__ import annotations

from leanlm.attention import ATTENTION_CLASSES
from leanlm.config import LeanLMConfig

VARIANTS = ("gqa", "mla", "gla", "nsa", "asa")


def parse_contexts(text: str) -> list[int]:
    """'8k,32k,131072' -> [8192, 32768, 131072] (k = 1024, m = 1024**2)."""
    out = []
    for part in text.split(","):
        p = part.strip().lower()
        mult = 1024 if p.endswith("k") else 1024 ** 2 if p.endswith("m") else 1
        num = p[:-1] if mult > 1 else p
        if not num.isdigit() or int(num) <= 0:
            raise ValueError(f"bad context length {part!r}: use e.g. 8k,32k,128k or 4096")
        out.append(int(num) * mult)
    return out


def cache_bytes(config: LeanLMConfig, context: int, dtype_bytes: int = 2) -> int:
    """Bytes of the whole model's cache for one sequence of `context` tokens."""
    return sum(ATTENTION_CLASSES[kind].cache_bytes(config, i, context, dtype_bytes)
               for i, kind in enumerate(config.layer_attention))


def variant(config: LeanLMConfig, attention: str) -> LeanLMConfig:
    """The same model (sizes, blocks, windows) with every layer of kind `attention`."""
    fields = config.to_dict()
    for key in ("model_type", "transformers_version", "architectures", "dtype", "torch_dtype"):
        fields.pop(key, None)
    fields["attention"] = attention
    return LeanLMConfig(**fields)


def kv_report(config: LeanLMConfig, contexts: list[int], dtype_bytes: int = 2) -> list[dict]:
    """One row per variant: the config itself (`config`, when it is not a plain single kind) and every kind in
    `VARIANTS`; each with bytes per token and per sequence at each context, and the ratio to NSA."""
    rows = []
    single = config.attention if isinstance(config.attention, str) else None
    models = [] if single in VARIANTS else [("config", config)]
    models += [(v, config if v == single else variant(config, v)) for v in VARIANTS]
    for name, cfg in models:
        seq = [cache_bytes(cfg, t, dtype_bytes) for t in contexts]
        rows.append({"variant": name, "contexts": contexts, "bytes_per_sequence": seq,
                     "bytes_per_token": [s / t for s, t in zip(seq, contexts)]})
    nsa = next(r for r in rows if r["variant"] == "nsa")
    for r in rows:
        r["vs_nsa"] = [a / b for a, b in zip(r["bytes_per_sequence"], nsa["bytes_per_sequence"])]
    return rows


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def format_report(rows: list[dict], config: LeanLMConfig, dtype_bytes: int) -> str:
    contexts = rows[0]["contexts"]
    label = [f"{t // 1024}k" if t % 1024 == 0 else str(t) for t in contexts]
    lines = [f"KV cache per sequence ({config.num_hidden_layers} layers, {dtype_bytes}-byte activations); "
             f"blocks l={config.nsa_compress_block} d={config.nsa_compress_stride} l'={config.nsa_select_block}, "
             f"window {config.nsa_window}",
             "| attention | " + " | ".join(f"bytes/token @{c}" for c in label) + " | "
             + " | ".join(f"per sequence @{c}" for c in label) + " | " + " | ".join(f"vs NSA @{c}" for c in label)
             + " |",
             "|---" * (1 + 3 * len(contexts)) + "|"]
    for r in rows:
        lines.append(f"| {r['variant']} | " + " | ".join(f"{b:,.0f}" for b in r["bytes_per_token"]) + " | "
                     + " | ".join(human(b) for b in r["bytes_per_sequence"]) + " | "
                     + " | ".join(f"{x:.0%}" for x in r["vs_nsa"]) + " |")
    return "\n".join(lines)
