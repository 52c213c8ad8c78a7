"""The gated delta rule of Gated DeltaNet: a recurrent form for decode and a chunked form for prefill.

Per value head, with state S [Dv, Dk], decay g_t in (0, 1], write strength beta_t in (0, 1):

    S~_t = g_t S_{t-1}                         decay
    u_t  = beta_t (v_t - S~_t k_t)              the part of v_t the decayed state does not predict
    S_t  = S~_t + u_t k_t^T                     delta-rule write
    o_t  = S_t q_t                              read

``gated_delta_recurrent`` runs this step by step with the same MLX ops, in the same order, as
mlx-lm's CPU path (``gated_delta_ops``), so it is the exact reference. ``gated_delta_chunked`` computes
the same outputs a chunk of C tokens at a time with matrix products (the WY / UT-transform form of
the DeltaNet papers), looping in Python only over chunks, never over tokens.

Names: B = batch, T = tokens, Hk / Hv = key / value heads, Dk / Dv = key / value head dims,
N = chunks, C = chunk size.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn

DEFAULT_CHUNK_SIZE = 64


@partial(mx.compile, shapeless=True)
def compute_g(A_log: mx.array, a: mx.array, dt_bias: mx.array) -> mx.array:
    """Per-token, per-head decay g = exp(-exp(A_log) * softplus(a + dt_bias)), in float32."""
    return mx.exp(-mx.exp(A_log.astype(mx.float32)) * nn.softplus(a + dt_bias))


def normalize_qk(q: mx.array, k: mx.array, *, eps: float = 1e-6) -> tuple[mx.array, mx.array]:
    """L2-normalises q and k over the head dim and folds the Dk**-0.5 read-out scale into q.

    Written with ``mx.fast.rms_norm`` as mlx-lm does (same rounding): rms_norm divides by
    sqrt(mean(x^2) + eps'), so the l2 norm's eps on sum(x^2) becomes eps' = eps / Dk.
    """
    inv_scale = q.shape[-1] ** -0.5
    rms_eps = eps * inv_scale**2
    q = (inv_scale**2) * mx.fast.rms_norm(q, None, rms_eps)
    k = inv_scale * mx.fast.rms_norm(k, None, rms_eps)
    return q, k


def _repeat_kv_heads(q: mx.array, k: mx.array, num_v_heads: int) -> tuple[mx.array, mx.array]:
    """Grouped heads: each key head serves Hv / Hk consecutive value heads."""
    if (r := num_v_heads // q.shape[-2]) > 1:
        q = mx.repeat(q, r, -2)
        k = mx.repeat(k, r, -2)
    return q, k


def zero_state(q: mx.array, v: mx.array) -> mx.array:
    """The empty recurrent state [B, Hv, Dv, Dk], float32."""
    B, _, _, Dk = q.shape
    Hv, Dv = v.shape[-2:]
    return mx.zeros((B, Hv, Dv, Dk), dtype=mx.float32)


# ----------------------------------------------------------------------------------------------------
# Recurrent form: one token at a time (decode; the reference for everything else).


@mx.compile
def gated_delta_step(
    q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, state: mx.array
) -> tuple[mx.array, mx.array]:
    """One token. q, k [B, Hv, Dk]; v [B, Hv, Dv]; g, beta [B, Hv]; state [B, Hv, Dv, Dk].

    Returns:
        (o [B, Hv, Dv] in q's dtype, new state [B, Hv, Dv, Dk]).
    """
    state = state * g[..., None, None]
    kv_mem = (state * k[..., None, :]).sum(axis=-1)  # S~ k: [B, Hv, Dv]
    delta = (v - kv_mem) * beta[..., None]  # u
    state = state + k[..., None, :] * delta[..., None]
    o = (state * q[..., None, :]).sum(axis=-1)
    return o.astype(q.dtype), state


def gated_delta_recurrent(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """The rule token by token. q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; g, beta [B, T, Hv].

    Returns:
        (o [B, T, Hv, Dv], final state [B, Hv, Dv, Dk] float32).
    """
    if state is None:
        state = zero_state(q, v)
    q, k = _repeat_kv_heads(q, k, v.shape[-2])
    outs = []
    for t in range(q.shape[1]):
        o, state = gated_delta_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state)
        outs.append(o)
    return mx.stack(outs, axis=1), state


# ----------------------------------------------------------------------------------------------------
# Chunked form. Within a chunk starting from state S0, with cumulative decay G_t = g_1 ... g_t:
#   u_t = beta_t v_t - beta_t G_t S0 k_t - sum_{s<t} beta_t (G_t/G_s) (k_t . k_s) u_s
# i.e. (I + A) U = beta V - (beta G K) S0^T with A_ts = beta_t (G_t/G_s) (k_t . k_s) for s < t. Then
#   O   = (G Q) S0^T + ((Q K^T) * D) U          D_ts = G_t / G_s for s <= t, else 0
#   S_C = G_C S0 + U^T ((G_C / G) K)
# Decay ratios are exponentials of differences of cumulative log decays, so nothing divides by a
# product that may have underflowed.


def _unit_lower_inverse(A: mx.array) -> mx.array:
    """(I + A)^-1 for strictly lower-triangular A [..., C, C], by repeated squaring.

    With N = -A nilpotent (N^C = 0): (I - N)^-1 = sum_k N^k = (I + N)(I + N^2)(I + N^4)...
    log2(C) matrix products instead of C sequential substitution steps.
    """
    C = A.shape[-1]
    eye = mx.eye(C, dtype=A.dtype)
    power = -A
    inverse = eye + power
    span = 2
    while span < C:
        power = power @ power
        inverse = inverse @ (eye + power)
        span *= 2
    return inverse


def _to_chunks(x: mx.array, chunk_size: int) -> mx.array:
    """[B, T, H, ...] -> [B, H, N, C, ...], zero-padding T up to a multiple of C."""
    B, T = x.shape[:2]
    pad = -T % chunk_size
    if pad:
        x = mx.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(B, (T + pad) // chunk_size, chunk_size, *x.shape[2:])
    return mx.moveaxis(x, 3, 1)


def gated_delta_chunked(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[mx.array, mx.array]:
    """The same rule as ``gated_delta_recurrent`` (same shapes), computed a chunk at a time in float32.

    Padding tokens get k = v = 0, beta = 0 and g = 1: they leave the state unchanged.
    """
    if state is None:
        state = zero_state(q, v)
    T, out_dtype = q.shape[1], q.dtype
    q, k = _repeat_kv_heads(q, k, v.shape[-2])
    f32 = mx.float32
    q, k, v = (_to_chunks(x.astype(f32), chunk_size) for x in (q, k, v))  # [B, H, N, C, D]
    beta = _to_chunks(beta.astype(f32), chunk_size)  # [B, H, N, C]
    log_g = _to_chunks(mx.log(g.astype(f32)), chunk_size)
    log_G = mx.cumsum(log_g, axis=-1)  # log G_t within each chunk

    C = chunk_size
    causal = mx.tril(mx.ones((C, C), dtype=mx.bool_))  # s <= t
    strict = mx.tril(mx.ones((C, C), dtype=mx.bool_), k=-1)  # s < t
    log_ratio = log_G[..., :, None] - log_G[..., None, :]  # log(G_t / G_s): [B, H, N, C, C]
    # Mask before exp: above the diagonal the ratio is > 1 and may overflow.
    D = mx.exp(mx.where(causal, log_ratio, -mx.inf))

    A = mx.where(strict, (k @ k.swapaxes(-1, -2)) * D * beta[..., None], 0.0)
    T_inv = _unit_lower_inverse(A)
    G = mx.exp(log_G)[..., None]  # [B, H, N, C, 1]
    u_free = T_inv @ (beta[..., None] * v)  # U when S0 = 0
    w = T_inv @ (beta[..., None] * G * k)  # U = u_free - w S0^T
    attn = (q @ k.swapaxes(-1, -2)) * D  # [B, H, N, C, C]
    decay_to_end = mx.exp(log_G[..., -1:] - log_G)[..., None]  # G_C / G_t

    outs = []
    for n in range(q.shape[2]):
        u = u_free[:, :, n] - w[:, :, n] @ state.swapaxes(-1, -2)  # [B, H, C, Dv]
        outs.append((G[:, :, n] * q[:, :, n]) @ state.swapaxes(-1, -2) + attn[:, :, n] @ u)
        end_decay = mx.exp(log_G[:, :, n, -1])[..., None, None]
        state = end_decay * state + u.swapaxes(-1, -2) @ (decay_to_end[:, :, n] * k[:, :, n])
    B, H, Dv = state.shape[0], state.shape[1], state.shape[2]
    o = mx.stack(outs, axis=1).swapaxes(2, 3)  # [B, N, H, C, Dv] -> [B, N, C, H, Dv]
    o = o.reshape(B, -1, H, Dv)[:, :T]
    return o.astype(out_dtype), state
