"""The sparse MoE block of a Qwen3.5 layer: router, top-k routed experts and the gated shared expert.

The block reaches its routed experts only through ``experts(x, indices)``, so resident and streamed
experts are interchangeable.

**Approximate routing** (opt-in, ``set_routing``; the default is the model's exact routing, computed by
exactly the same operations as mlx-lm):

- fewer experts per token than the model's top-k: the k' most probable, their scores renormalised when
  the model's ``norm_topk_prob`` says so (Qwen3.5: yes), else the raw probabilities of the k';
- cache-aware routing (after arXiv 2412.00099, "Mixture of Cache-Conditional Experts"): ``cache_bias``
  is added to the router *logits* of the experts that are in the expert cache right now, before top-k.
  On logits the bias is a bounded ratio of probabilities: a cached expert displaces an uncached one only
  when p_cached >= p_uncached * exp(-bias), whatever the router's scale or the number of experts (on
  probabilities an additive bias would swap freely among the many near-zero experts of a 512-way
  router). The chosen experts are weighted by the unbiased probabilities: the bias decides *which*
  experts run, never how much each contributes.

**Observer** (``set_observer``, off by default): a callable that gets (layer, indices [B, L, K], scores
[B, L, K], y [B, L, K, H]) for every call, the routed experts' outputs before they are weighted (REAP
saliency is measured from these). Unset, the block computes exactly what it does without the hook.

Names: B = batch, L = tokens in this call, H = hidden size, K = experts per token, E = experts.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from streamer.models.args import ModelArgs
from streamer.models.layers import SwiGLUMLP
from streamer.models.resident_experts import Experts, ResidentExperts

# (layer, indices [B, L, K], scores [B, L, K], expert outputs [B, L, K, H]) -> None
Observer = Callable[[int, mx.array, mx.array, mx.array], None]


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
        # Routing actually used (set_routing); plain attributes, not parameters.
        self.experts_per_token = self.top_k
        self.cache_bias = 0.0
        self.cached_mask: Callable[[], mx.array | None] | None = None
        self.observer: Observer | None = None
        self.observer_layer = 0

    @property
    def experts(self) -> Experts:
        return self.switch_mlp

    def replace_experts(self, experts: Experts) -> None:
        """Routes this layer's experts through ``experts`` (e.g. a streamed implementation)."""
        # nn.Module drops the resident weights from the parameter tree when a non-Module replaces them.
        self.switch_mlp = experts

    def set_routing(
        self,
        experts_per_token: int | None = None,
        cache_bias: float = 0.0,
        cached_mask: Callable[[], mx.array | None] | None = None,
    ) -> None:
        """Chooses the routing: the defaults are the model's exact routing.

        Args:
            experts_per_token: experts per token, 1 .. the model's top-k (None: the model's top-k).
            cache_bias: added to the router logits of cached experts before top-k (0: off).
            cached_mask: () -> [E] float array, 1 where this layer's expert is cached now (None when every
                expert is cached, which makes the bias moot); needed when ``cache_bias`` is not 0.

        Raises:
            ValueError: ``experts_per_token`` outside 1 .. top-k, a negative or infinite bias, or a bias
                without ``cached_mask``.
        """
        k = self.top_k if experts_per_token is None else experts_per_token
        if not 1 <= k <= self.top_k:
            raise ValueError(f"experts per token must be 1 .. {self.top_k} (the model's top-k), got {k}")
        if not (cache_bias >= 0 and cache_bias < float("inf")):
            raise ValueError(f"cache bias must be a finite number >= 0, got {cache_bias}")
        if cache_bias and cached_mask is None:
            raise ValueError("a cache bias needs cached_mask (which experts are cached)")
        self.experts_per_token, self.cache_bias, self.cached_mask = k, float(cache_bias), cached_mask

    def set_observer(self, observer: Observer | None, layer: int = 0) -> None:
        """Calls ``observer(layer, indices, scores, y)`` on every forward pass (None: off)."""
        self.observer, self.observer_layer = observer, layer

    def __call__(self, x: mx.array) -> mx.array:
        logits = self.gate(x)
        probs = mx.softmax(logits, axis=-1, precise=True)  # [B, L, E]
        indices = self._choose(logits, probs)  # [B, L, K]
        scores = mx.take_along_axis(probs, indices, axis=-1)
        if self.norm_topk_prob:
            scores = scores / scores.sum(axis=-1, keepdims=True)
        y = self.experts(x, indices)  # [B, L, K, H]
        if self.observer is not None:
            self.observer(self.observer_layer, indices, scores, y)
        y = (y * scores[..., None]).sum(axis=-2)
        shared = mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y + shared

    def _choose(self, logits: mx.array, probs: mx.array) -> mx.array:
        """The experts each token runs: [B, L, K] ids (K = experts_per_token)."""
        k = self.experts_per_token
        mask = self.cached_mask() if self.cache_bias else None  # [E]
        if mask is None:
            # argpartition, as mlx-lm: the same k experts in the same order, ties broken the same way.
            return mx.argpartition(probs, kth=-k, axis=-1)[..., -k:]
        biased = logits.astype(mx.float32) + self.cache_bias * mask  # [B, L, E]
        return mx.argpartition(biased, kth=-k, axis=-1)[..., -k:]
