"""NSA's branch operations on the Triton kernels, with the signatures of the references in `leanlm.attention.sparse`
(so `SparseBranches` runs one body over either set; tests call both with the same arguments).

    compression_attention  banded kernel over compressed blocks -> (out, lse)
    select_blocks          on-device top-n from (q, compressed keys, lse)
    selection_attention    attention over each group's selected blocks
    window_attention       banded sliding-window kernel
"""

from leanlm.kernels.banded import compression_attention, window_attention
from leanlm.kernels.selection import selection_attention
from leanlm.kernels.topk import select_blocks

LATENT_PARTS = False  # keys come as one tensor

__all__ = ["LATENT_PARTS", "compression_attention", "select_blocks", "selection_attention", "window_attention"]
