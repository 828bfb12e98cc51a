"""leanlm: train and serve small-to-mid language models efficiently (WISCA, ASA, C2T)."""

from leanlm.config import LeanLMConfig
from leanlm.errors import CheckpointError, ConfigError, DataError, LeanLMError
from leanlm.model import LeanLMForCausalLM, LeanLMModel

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "DataError", "LeanLMConfig", "LeanLMError", "LeanLMForCausalLM",
           "LeanLMModel", "__version__"]
