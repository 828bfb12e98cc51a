"""Small shared pieces of the Triton kernels: tile sizes and layout rules."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

INF_WINDOW = 1 << 30  # "no window": larger than any position difference, small enough not to overflow int32 maths


def block_dim(n: int) -> int:
    """Tile width for a head dimension of n channels: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(n))


def contiguous_last(x: torch.Tensor) -> torch.Tensor:
    """x with unit stride in its last dimension (the kernels index the other dimensions through strides)."""
    return x if x.stride(-1) == 1 else x.contiguous()


@triton.jit
def load_tile(ptr, rows, row_stride, row_ok, width, BD: tl.constexpr):
    """Rows `rows` [R] of a row-major matrix at `ptr` (unit stride along the row), `width` channels padded to BD with
    zeros; rows where `row_ok` is False read as zeros."""
    d = tl.arange(0, BD)
    return tl.load(ptr + rows[:, None] * row_stride + d[None, :], mask=row_ok[:, None] & (d[None, :] < width),
                   other=0.0)


@triton.jit
def online_softmax_step(s, v, m_i, l_i, acc):
    """One key tile of flash attention: scores s [M, N] in log2 units (-inf = masked), values v [N, D]; updates the
    running max m_i [M], normaliser l_i [M] and output accumulator acc [M, D]. Rows with nothing seen stay at 0."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def softmax_finish(m_i, l_i, acc):
    """Normalised output [M, D] and natural-log LSE [M] (-inf, with a zero output, where no key was seen)."""
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
    return o, lse
