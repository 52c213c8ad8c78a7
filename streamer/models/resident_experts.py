"""Routed experts: the one object the MoE block calls, ``experts(x, indices) -> per-expert outputs``.

``ResidentExperts`` keeps every expert of a layer in memory as stacked tensors (HF names
``switch_mlp.{gate,up,down}_proj.{weight,scales,biases}``, expert index leading) and runs them with
``mx.gather_qmm`` / ``mx.gather_mm``, the kernels mlx-lm's SwitchGLU uses, in the same order. A
streamed implementation plugs in behind the same call.

Names: E = experts, K = experts per token, H = hidden size, I = expert intermediate size,
M = token-expert pairs (tokens * K).
"""

from __future__ import annotations

import math
from typing import Protocol

import mlx.core as mx
import mlx.nn as nn

from streamer.models.layers import swiglu

# From this many token-expert pairs on, pairs are sorted by expert so each expert's weights are read
# once (mlx-lm's SwitchGLU threshold; kept equal so results match it bit for bit).
SORT_MIN_PAIRS = 64


class Experts(Protocol):
    """What the MoE block needs from its routed experts."""

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """x [..., H] and expert ids [..., K] -> each chosen expert's SwiGLU output [..., K, H]."""
        ...


class ExpertLinear(nn.Module):
    """E stacked unquantized projections: weight [E, out, in]."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        scale = math.sqrt(1 / input_dims)
        self.weight = mx.random.uniform(-scale, scale, (num_experts, output_dims, input_dims))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_mm(
            x, self.weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices
        )

    def to_quantized(
        self, group_size: int = 64, bits: int = 4, mode: str = "affine"
    ) -> QuantizedExpertLinear:
        num_experts, output_dims, input_dims = self.weight.shape
        q = QuantizedExpertLinear(input_dims, output_dims, num_experts, group_size, bits, mode)
        q.weight, q.scales, *biases = mx.quantize(self.weight, group_size, bits, mode=mode)
        q.biases = biases[0] if biases else None
        return q


class QuantizedExpertLinear(nn.Module):
    """E stacked quantized projections.

    weight [E, out, in * bits / 32] uint32; scales and biases [E, out, in / group_size].
    """

    def __init__(
        self, input_dims: int, output_dims: int, num_experts: int, group_size: int, bits: int, mode: str
    ):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        # Placeholders with the stored shapes; the loader replaces them.
        self.weight = mx.zeros((num_experts, output_dims, input_dims * bits // 32), dtype=mx.uint32)
        groups = (num_experts, output_dims, input_dims // group_size)
        self.scales = mx.zeros(groups)
        self.biases = mx.zeros(groups) if mode == "affine" else None

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return gather_qmm_experts(
            x, self.weight, self.scales, self.get("biases"), indices, self.bits, self.group_size, self.mode,
            sorted_indices,
        )  # fmt: skip


def gather_qmm_experts(
    x, weight, scales, biases, indices, bits: int, group_size: int, mode: str, sorted_indices: bool
) -> mx.array:
    """x @ W_e^T for the quantized expert (or slot) ``e`` of each row: the call resident and streamed
    experts share, so both run the identical kernel with identical arguments."""
    return mx.gather_qmm(
        x,
        weight,
        scales,
        biases,
        rhs_indices=indices,
        transpose=True,
        group_size=group_size,
        bits=bits,
        mode=mode,
        sorted_indices=sorted_indices,
    )


class ResidentExperts(nn.Module):
    """All E experts of one layer held in memory; down(silu(gate(x)) * up(x)) per chosen expert."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int):
        super().__init__()
        self.gate_proj = ExpertLinear(hidden_size, intermediate_size, num_experts)
        self.up_proj = ExpertLinear(hidden_size, intermediate_size, num_experts)
        self.down_proj = ExpertLinear(intermediate_size, hidden_size, num_experts)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        return switch_glu(x, indices, self.gate_proj, self.up_proj, self.down_proj)


def switch_glu(x: mx.array, indices: mx.array, gate_proj, up_proj, down_proj) -> mx.array:
    """down(silu(gate(x)) * up(x)) for each of the K experts of each token, as mlx-lm's SwitchGLU.

    Args:
        x: [..., H] tokens.
        indices: [..., K] ids into the projections' leading axis (expert ids, or cache slot ids).
        gate_proj, up_proj, down_proj: callables ``(x, indices, sorted_indices) -> y``.

    Returns:
        [..., K, H] per-expert outputs, in ``indices`` order.
    """
    x = mx.expand_dims(x, (-2, -3))  # [..., 1, 1, H]: one row per expert matmul
    do_sort = indices.size >= SORT_MIN_PAIRS
    idx, inv_order = indices, None
    if do_sort:
        x, idx, inv_order = sort_by_expert(x, indices)
    up = up_proj(x, idx, sorted_indices=do_sort)
    gate = gate_proj(x, idx, sorted_indices=do_sort)
    y = down_proj(swiglu(gate, up), idx, sorted_indices=do_sort)
    if do_sort:
        y = mx.unflatten(y[inv_order], 0, indices.shape)  # [..., K, 1, H]
    return y.squeeze(-2)


def sort_by_expert(x: mx.array, indices: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """Orders the M token-expert pairs by expert id.

    Args:
        x: [..., 1, 1, H] tokens.
        indices: [..., K] expert ids.

    Returns:
        (x per pair [M, 1, H] in expert order, sorted ids [M], the permutation that undoes the sort).
    """
    K = indices.shape[-1]
    flat = indices.flatten()
    order = mx.argsort(flat)
    inv_order = mx.argsort(order)
    return x.flatten(0, -3)[order // K], flat[order], inv_order
