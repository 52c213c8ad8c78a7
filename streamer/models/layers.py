"""Small building blocks shared by the model and the experts: activations and the gated RMSNorm.

The activations are compiled elementwise kernels, as in mlx-lm, so that fused rounding matches it.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn


@partial(mx.compile, shapeless=True)
def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """silu(gate) * x."""
    return nn.silu(gate) * x


@partial(mx.compile, shapeless=True)
def _gated_output(h: mx.array, gate: mx.array, x: mx.array) -> mx.array:
    # silu(gate) * x in float32, returned in the dtype of the un-normalised input h.
    return (nn.silu(gate.astype(mx.float32)) * x.astype(mx.float32)).astype(h.dtype)


class RMSNormGated(nn.Module):
    """RMSNorm(h) * silu(gate), the output norm of Gated DeltaNet (weights ``norm.weight``)."""

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones(dims)

    def __call__(self, h: mx.array, gate: mx.array) -> mx.array:
        return _gated_output(h, gate, mx.fast.rms_norm(h, self.weight, self.eps))


class SwiGLUMLP(nn.Module):
    """down(silu(gate(x)) * up(x)): the shared expert (weights ``{gate,up,down}_proj``)."""

    def __init__(self, dims: int, hidden_dims: int):
        super().__init__()
        self.gate_proj = nn.Linear(dims, hidden_dims, bias=False)
        self.up_proj = nn.Linear(dims, hidden_dims, bias=False)
        self.down_proj = nn.Linear(hidden_dims, dims, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
