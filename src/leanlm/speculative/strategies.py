"""The token-tree strategies by name: the one table the CLI, `leanlm.speculative.generate` and the benchmarks read.

    chain   one path of `length` draft tokens                 static  a fixed tree of paths (EAGLE-1's default)
    eagle2  EAGLE-2's dynamic tree (total_tokens/depth/top_k)  c2t     C2T's classifier-pruned tree
"""

from __future__ import annotations

import inspect

from leanlm.speculative.c2t import C2T
from leanlm.speculative.tree import Chain, Eagle2, StaticTree, TreeStrategy

STRATEGIES: dict[str, type[TreeStrategy]] = {"chain": Chain, "static": StaticTree, "eagle2": Eagle2, "c2t": C2T}


def make_strategy(name: str, **kw) -> TreeStrategy:
    """Strategy by name (a key of `STRATEGIES`) with its constructor's keyword arguments."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown speculative strategy {name!r}; use one of {sorted(STRATEGIES)} or none")
    return STRATEGIES[name](**kw)


def parse_strategy(spec: str, **defaults) -> TreeStrategy:
    """A strategy from text: `name` or `name:key=value:key=value`, e.g. `eagle2:total_tokens=30:depth=5`,
    `c2t:beta=0.3`. Values are read as int, then float, then None/str; `defaults` (e.g. classifier=PATH) fill
    arguments the text leaves out and that the strategy takes."""
    name, *pairs = spec.strip().split(":")
    kw = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"strategy {spec!r}: {pair!r} is not key=value")
        key, value = pair.split("=", 1)
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                continue
        kw[key] = None if value == "None" else value
    if name in STRATEGIES:
        accepted = inspect.signature(STRATEGIES[name].__init__).parameters
        bad = [k for k in kw if k not in accepted]
        if bad:
            raise ValueError(f"strategy {spec!r}: {name} takes no {bad}; it takes {sorted(set(accepted) - {'self'})}")
        kw = {k: v for k, v in defaults.items() if k in accepted and v is not None} | kw
    return make_strategy(name, **kw)
