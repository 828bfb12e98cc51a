"""Triton kernels for sparse and latent attention, each with its PyTorch reference in `leanlm.attention.sparse`.

  banded.py     compression and sliding-window attention (forward + backward, returns the log-sum-exp)
  topk.py       top-n block selection on device from the compression scores
  selection.py  selection attention over the top-n blocks, shared by a KV group (forward + backward)
  decode.py     split-K decode over MLA/GLA latent caches, dense or over selected blocks
  dispatch.py   kernels on CUDA, references on CPU; `attention_kernels` / LEANLM_KERNELS force either

Importing the kernel modules needs Triton; `dispatch` does not.
"""

from leanlm.kernels.dispatch import KERNEL_CHOICES, kernel_choice, use_kernels

__all__ = ["KERNEL_CHOICES", "kernel_choice", "use_kernels"]
