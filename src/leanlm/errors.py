"""Error types raised by leanlm before any work starts.

Every error names the offending field (or file) and says how to fix it, so the command-line tool can print
one line and exit without a traceback.
"""

from __future__ import annotations


class LeanLMError(Exception):
    """Base class for all user-facing leanlm errors."""


class ConfigError(LeanLMError, ValueError):
    """A configuration value is invalid. The message names the field and the fix."""

    def __init__(self, field: str, problem: str, fix: str):
        self.field = field
        super().__init__(f"config field '{field}': {problem}. Fix: {fix}")


class DataError(LeanLMError, ValueError):
    """A corpus or data file cannot be used (missing, empty, not UTF-8, ...)."""


class CheckpointError(LeanLMError, ValueError):
    """A checkpoint is missing, incomplete or corrupt."""


class TrainingError(LeanLMError, RuntimeError):
    """Training cannot go on (e.g. the loss became NaN or infinite); the last good checkpoint is kept."""


class RunLockedError(LeanLMError, RuntimeError):
    """Another process holds the out_dir of this run."""


class ModelError(LeanLMError, TypeError):
    """A model (or other object) passed to a leanlm function is of a kind it cannot use."""
