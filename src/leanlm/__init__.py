"""leanlm: train and serve small-to-mid language models efficiently (WISCA, ASA, C2T).

The errors are imported eagerly (they need nothing); the model and its config are imported on first use, so that
`leanlm --help` and argument errors answer without loading torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from leanlm.errors import CheckpointError, ConfigError, DataError, LeanLMError

if TYPE_CHECKING:
    from leanlm.config import LeanLMConfig
    from leanlm.model import LeanLMForCausalLM, LeanLMModel

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "DataError", "LeanLMConfig", "LeanLMError", "LeanLMForCausalLM",
           "LeanLMModel", "__version__"]

_LAZY = {"LeanLMConfig": "leanlm.config", "LeanLMForCausalLM": "leanlm.model", "LeanLMModel": "leanlm.model"}


def __getattr__(name: str):
    if name in _LAZY:

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
