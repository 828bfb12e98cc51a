"""Name -> attention class registry; `LeanLMConfig.attention` names entries of it."""

from __future__ import annotations

from typing import Callable

ATTENTION_REGISTRY: dict[str, type] = {}


def register_attention(name: str) -> Callable[[type], type]:
    """Class decorator: make an `Attention` subclass selectable as `attention: <name>` in a config."""

    def deco(cls: type) -> type:
        if name in ATTENTION_REGISTRY and ATTENTION_REGISTRY[name] is not cls:
            raise ValueError(f"attention kind {name!r} is registered twice")
        ATTENTION_REGISTRY[name] = cls
        return cls

    return deco
