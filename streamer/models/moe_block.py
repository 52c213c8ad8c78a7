"""The sparse MoE block of a Qwen3.5 layer: router, top-k routed experts and the gated shared expert.

The block reaches its routed experts only through ``experts(x, indices)``, so resident and streamed
experts are interchangeable.

Names: B = batch, L = tokens in this call, H = hidden size, K = experts per token, E = experts.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from streamer.models.args import ModelArgs
from streamer.models.layers import SwiGLUMLP
from streamer.models.resident_experts import Experts, ResidentExperts


class SparseMoeBlock(nn.Module):
    """softmax router -> top-k -> sum_k score_k * expert_k(x), plus a sigmoid-gated shared expert."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        H, E = args.hidden_size, args.num_experts
        self.top_k = args.num_experts_per_tok
        self.norm_topk_prob = args.norm_topk_prob
        self.gate = nn.Linear(H, E, bias=False)  # router
        # HF name for the routed experts' weights; the block calls them only through `experts`.
        self.switch_mlp = ResidentExperts(H, args.moe_intermediate_size, E)
        self.shared_expert = SwiGLUMLP(H, args.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(H, 1, bias=False)

    @property
    def experts(self) -> Experts:
        return self.switch_mlp

    def replace_experts(self, experts: Experts) -> None:
        """Routes this layer's experts through ``experts`` (e.g. a streamed implementation)."""
        # nn.Module drops the resident weights from the parameter tree when a non-Module replaces them.
        self.switch_mlp = experts

    def __call__(self, x: mx.array) -> mx.array:
        probs = mx.softmax(self.gate(x), axis=-1, precise=True)  # [B, L, E]
        # argpartition, as mlx-lm: the same k experts in the same order, ties broken the same way.
        indices = mx.argpartition(probs, kth=-self.top_k, axis=-1)[..., -self.top_k :]  # [B, L, K]
        scores = mx.take_along_axis(probs, indices, axis=-1)
        if self.norm_topk_prob:
            scores = scores / scores.sum(axis=-1, keepdims=True)
        y = self.experts(x, indices)  # [B, L, K, H]
        y = (y * scores[..., None]).sum(axis=-2)
        shared = mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y + shared
