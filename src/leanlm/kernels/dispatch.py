"""Which implementation the sparse/latent attention layers run: the Triton kernels or the PyTorch references.

`attention_kernels` (config field) and the `LEANLM_KERNELS` environment variable (which wins when set) take
  auto    Triton on CUDA tensors when Triton is installed, the PyTorch reference otherwise (the default);
  triton  always the kernels (on CPU tensors this needs TRITON_INTERPRET=1: the Triton interpreter, for tests);
  torch   always the references (`leanlm.attention.sparse`, dense masked attention).
Tree-masked and padded batches always take the reference path (the kernels know only causal/band/block masks).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from leanlm.config import KERNEL_CHOICES
from leanlm.errors import ConfigError

ENV = "LEANLM_KERNELS"


def kernel_choice(config_value: str = "auto") -> str:
    """The effective choice: the environment variable if set, else the config's value (both checked)."""
    env = os.environ.get(ENV)
    if env:
        if env not in KERNEL_CHOICES:
            raise ConfigError(ENV, f"environment variable {ENV}={env!r} is not a kernel choice",
                              f"set it to one of {', '.join(KERNEL_CHOICES)} or unset it")
        return env
    return config_value


@functools.cache
def _have_triton() -> bool:
    """Whether Triton is installed (looked up once: every sparse/latent layer asks on every forward)."""
    return importlib.util.find_spec("triton") is not None


def use_kernels(device: torch.device, config_value: str = "auto") -> bool:
    """True when the Triton kernels should run for tensors on `device`."""
    choice = kernel_choice(config_value)
    if choice == "torch":
        return False
    have_triton = _have_triton()
    if choice == "auto":
        return device.type == "cuda" and have_triton
    if not have_triton:
        raise ConfigError("attention_kernels", "is 'triton' but Triton is not installed",
                          "pip install triton, or use attention_kernels: auto")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("attention_kernels", f"is 'triton' for {device.type} tensors, which Triton cannot run "
                          "without its interpreter", "set TRITON_INTERPRET=1 (slow; for tests) or use auto")
    return True
