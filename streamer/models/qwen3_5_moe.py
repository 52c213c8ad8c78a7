"""Qwen3.5 hybrid MoE text model: Gated DeltaNet and gated full attention, a sparse MoE in every layer.

Layer i mixes tokens with Gated DeltaNet when (i + 1) % full_attention_interval != 0, else with full
attention; every layer then applies the MoE block. Weight names are the HF / mlx-community names.
The MoE block reaches its routed experts only through ``experts(x, indices)``.

Names: B = batch, L = tokens in this call, H = hidden size, K = experts per token, E = experts,
Hq / Hkv = attention query / key-value heads, D = attention head dim,
Hk / Hv = DeltaNet key / value heads, Dk / Dv = DeltaNet key / value head dims.
"""

from __future__ import annotations

from typing import Literal

import mlx.core as mx
import mlx.nn as nn

from streamer.errors import ConfigError
from streamer.models import gated_delta
from streamer.models.args import ModelArgs
from streamer.models.layer_cache import (
    DeltaNetBatch,
    DeltaNetCache,
    KVBatch,
    KVCache,
    LayerCache,
    RaggedBatch,
)
from streamer.models.layers import RMSNormGated
from streamer.models.moe_block import SparseMoeBlock

# How DeltaNet layers run a multi-token call: "chunked" (matrix form, fast prefill) or
# "recurrent" (token by token, the exact mlx-lm CPU order). Single tokens always run recurrent.
DeltaRule = Literal["chunked", "recurrent"]
DELTA_RULES = ("chunked", "recurrent")


class GatedDeltaNet(nn.Module):
    """Linear attention with a gated delta-rule state (see gated_delta.py for the recurrence)."""

    def __init__(self, args: ModelArgs, delta_rule: DeltaRule = "chunked"):
        super().__init__()
        self.num_k_heads, self.num_v_heads = args.linear_num_key_heads, args.linear_num_value_heads
        self.head_k_dim, self.head_v_dim = args.linear_key_head_dim, args.linear_value_head_dim
        self.key_dim, self.conv_dim = args.linear_key_dim, args.conv_dim
        self.conv_kernel_size = args.linear_conv_kernel_dim
        self.delta_rule = delta_rule

        H, Hv = args.hidden_size, self.num_v_heads
        self.in_proj_qkv = nn.Linear(H, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(H, args.linear_value_dim, bias=False)  # output gate
        self.in_proj_b = nn.Linear(H, Hv, bias=False)  # write strength beta = sigmoid(b)
        self.in_proj_a = nn.Linear(H, Hv, bias=False)  # decay input
        # Depthwise causal convolution over time; weight [conv_dim, Kc, 1].
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, self.conv_kernel_size, groups=self.conv_dim, bias=False
        )
        self.A_log = mx.zeros(Hv)
        self.dt_bias = mx.ones(Hv)
        self.norm = RMSNormGated(self.head_v_dim, eps=args.rms_norm_eps)
        self.out_proj = nn.Linear(args.linear_value_dim, H, bias=False)

    def __call__(
        self, x: mx.array, cache: DeltaNetCache | DeltaNetBatch | RaggedBatch | None = None
    ) -> mx.array:
        if isinstance(cache, RaggedBatch):  # several prompts end to end: each span with its own state
            return cache.map(self, x)
        B, L, _ = x.shape
        qkv = self.in_proj_qkv(x)
        z = self.in_proj_z(x).reshape(B, L, self.num_v_heads, self.head_v_dim)
        b, a = self.in_proj_b(x), self.in_proj_a(x)

        conv_state = cache.conv_state if cache is not None else None
        if conv_state is None:
            conv_state = mx.zeros((B, self.conv_kernel_size - 1, self.conv_dim), dtype=x.dtype)
        conv_input = mx.concatenate([conv_state, qkv], axis=1)  # [B, Kc - 1 + L, conv_dim]
        conv_out = nn.silu(self.conv1d(conv_input))  # [B, L, conv_dim]
        q, k, v = mx.split(conv_out, [self.key_dim, 2 * self.key_dim], axis=-1)
        q = q.reshape(B, L, self.num_k_heads, self.head_k_dim)
        k = k.reshape(B, L, self.num_k_heads, self.head_k_dim)
        v = v.reshape(B, L, self.num_v_heads, self.head_v_dim)
        q, k = gated_delta.normalize_qk(q, k)

        g = gated_delta.compute_g(self.A_log, a, self.dt_bias)  # decay [B, L, Hv]
        beta = mx.sigmoid(b)
        state = cache.recurrent_state if cache is not None else None
        if L > 1 and self.delta_rule == "chunked":
            out, state = gated_delta.gated_delta_chunked(q, k, v, g, beta, state)
        else:
            out, state = gated_delta.gated_delta_recurrent(q, k, v, g, beta, state)

        if cache is not None:
            cache.update(mx.contiguous(conv_input[:, -(self.conv_kernel_size - 1) :, :]), state, L)
        out = self.norm(out, z)  # [B, L, Hv, Dv]
        return self.out_proj(out.reshape(B, L, -1))


class Attention(nn.Module):
    """Causal GQA with q/k RMSNorm, partial rotary embedding and a sigmoid output gate per channel."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_heads, self.num_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = self.head_dim**-0.5
        H, D, bias = args.hidden_size, self.head_dim, args.attention_bias
        # q_proj gives, per head, D query channels followed by D output-gate channels.
        self.q_proj = nn.Linear(H, self.num_heads * D * 2, bias=bias)
        self.k_proj = nn.Linear(H, self.num_kv_heads * D, bias=bias)
        self.v_proj = nn.Linear(H, self.num_kv_heads * D, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * D, H, bias=bias)
        self.q_norm = nn.RMSNorm(D, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(D, eps=args.rms_norm_eps)
        self.rope = nn.RoPE(args.rotary_dim, traditional=False, base=args.rope_theta)

    def __call__(self, x: mx.array, cache: KVCache | KVBatch | RaggedBatch | None = None) -> mx.array:
        if isinstance(cache, RaggedBatch):  # several prompts end to end: each span over its own cache
            return cache.map(self, x)
        B, L, _ = x.shape
        queries, gate = mx.split(self.q_proj(x).reshape(B, L, self.num_heads, -1), 2, axis=-1)
        keys = self.k_proj(x).reshape(B, L, self.num_kv_heads, -1)
        values = self.v_proj(x).reshape(B, L, self.num_kv_heads, -1)
        queries = self.q_norm(queries).transpose(0, 2, 1, 3)  # [B, Hq, L, D]
        keys = self.k_norm(keys).transpose(0, 2, 1, 3)  # [B, Hkv, L, D]
        values = values.transpose(0, 2, 1, 3)

        if isinstance(cache, KVBatch):  # each sequence attends over its own cache, as it would alone
            rows = [
                self._attend(queries[i : i + 1], keys[i : i + 1], values[i : i + 1], member)
                for i, member in enumerate(cache.members)
            ]
            out = mx.concatenate(rows, axis=0)
        else:
            out = self._attend(queries, keys, values, cache)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self.o_proj(out * mx.sigmoid(gate.reshape(B, L, -1)))

    def _attend(self, queries: mx.array, keys: mx.array, values: mx.array, cache: KVCache | None) -> mx.array:
        """Rotary positions, the cache update and attention for sequences of one length: [B, Hq, L, D]."""
        offset = cache.offset if cache is not None else 0
        queries = self.rope(queries, offset=offset)
        keys = self.rope(keys, offset=offset)
        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)
        # A single new token may see every cached one; several are causal among themselves.
        mask = "causal" if queries.shape[2] > 1 else None
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=self.scale, mask=mask)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int, delta_rule: DeltaRule = "chunked"):
        super().__init__()
        self.is_linear = args.is_linear[layer_idx]
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(args, delta_rule)
        else:
            self.self_attn = Attention(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.mlp = SparseMoeBlock(args)

    def __call__(self, x: mx.array, cache: LayerCache | None = None) -> mx.array:
        mixer = self.linear_attn if self.is_linear else self.self_attn
        h = x + mixer(self.input_layernorm(x), cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class TextModel(nn.Module):
    """Embedding, decoder layers and final norm (``language_model.model``)."""

    def __init__(self, args: ModelArgs, delta_rule: DeltaRule = "chunked"):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i, delta_rule) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class LanguageModel(nn.Module):
    """``language_model``: the text model and its output head."""

    def __init__(self, args: ModelArgs, delta_rule: DeltaRule = "chunked"):
        super().__init__()
        self.model = TextModel(args, delta_rule)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)


def default_delta_rule(dtype: mx.Dtype) -> DeltaRule:
    """The chunked form (fast prefill) in float32; the recurrent form for 16-bit activations on a CPU.

    mlx-lm's CPU path runs the recurrent ops for prompts too. In float32 the chunked form agrees with them
    to ~1e-5; in bfloat16 its different summation order changes greedy tokens (a 12-token prompt on a
    random bf16 checkpoint diverged at the 4th token; recurrent: identical to mlx-lm on every case tried).
    On a GPU mlx-lm runs its own kernel instead, and the chunked form stays (recurrent ops would make
    prefill sequential there).
    """
    if dtype == mx.float32 or mx.default_device() != mx.cpu:
        return "chunked"
    return "recurrent"


def last_positions(h: mx.array, caches: list) -> mx.array:
    """The hidden states [B, L, H] of each sequence's last position: [B, 1, H], or [1, G, H] when
    ``caches`` are ragged (G prompts end to end in one row)."""
    ragged = caches[0] if isinstance(caches[0], RaggedBatch) else None
    return h[:, ragged.last_positions, :] if ragged else h[:, -1:, :]


class Model(nn.Module):
    """Token ids [B, L] -> logits [B, L, V].

    Args:
        args: the model's hyper-parameters.
        dtype: activation dtype; embeddings (whose dtype is that of the stored scales) are cast to it.
        delta_rule: how DeltaNet layers process multi-token calls ("chunked" or "recurrent"); None picks
            ``default_delta_rule(dtype)``.
    """

    def __init__(self, args: ModelArgs, dtype: mx.Dtype = mx.float32, delta_rule: DeltaRule | None = None):
        super().__init__()
        delta_rule = delta_rule or default_delta_rule(dtype)
        if delta_rule not in DELTA_RULES:
            raise ConfigError(f"delta_rule {delta_rule!r} is not one of {', '.join(DELTA_RULES)}")
        self.args = args
        self.dtype = dtype
        self.language_model = LanguageModel(args, delta_rule)

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.language_model.model.layers

    def __call__(
        self, tokens: mx.array, cache: list[LayerCache] | None = None, last_only: bool = False
    ) -> mx.array:
        """Logits [B, L, V], or [B, 1, V] for the last position only with ``last_only`` (prefill).

        ``cache`` is per-layer: each sequence's own caches (``make_cache()``), ``batch_caches`` for B
        sequences decoding one token each, or ``ragged_caches`` for G prompts end to end in one row
        (tokens [1, T]); with ``last_only`` the latter gives [1, G, V], each prompt's last position."""
        text = self.language_model.model
        h = text.embed_tokens(tokens).astype(self.dtype)  # [B, L, H]
        caches = cache if cache is not None else [None] * len(self.layers)
        for layer, c in zip(self.layers, caches, strict=True):
            h = layer(h, c)
        if last_only:  # the output head on one position instead of L (V can be 248k)
            h = last_positions(h, caches)
        h = text.norm(h)
        if self.args.tie_word_embeddings:
            return text.embed_tokens.as_linear(h)
        return self.language_model.lm_head(h)

    def decode_is_lazy(self) -> bool:
        """Whether a decode step is one lazy graph with no host sync inside: resident experts, or streamed
        ones all cached with no routing hook. Only then can the next step be built while this one runs."""
        return all(getattr(layer.mlp.experts, "lazy", True) for layer in self.layers)

    def state_bytes(self, tokens: int) -> int:
        """Bytes of one sequence's layer caches after ``tokens`` tokens (KV grows with them, DeltaNet not).

        KV buffers grow ``KVCache.step`` positions at a time, so this rounds up the way they do.
        """
        a, itemsize = self.args, self.dtype.size
        positions = -(-max(tokens, 1) // KVCache.step) * KVCache.step
        kv = 2 * a.num_key_value_heads * a.head_dim * positions * itemsize
        conv = (a.linear_conv_kernel_dim - 1) * a.conv_dim * itemsize
        recurrent = a.linear_num_value_heads * a.linear_value_head_dim * a.linear_key_head_dim * 4  # float32
        linear = sum(a.is_linear)
        return linear * (conv + recurrent) + (len(a.is_linear) - linear) * kv

    def make_cache(self) -> list[LayerCache]:
        """Fresh per-layer state: a DeltaNetCache for linear layers, a KVCache for attention layers."""
        return [DeltaNetCache() if layer.is_linear else KVCache() for layer in self.layers]
