"""Gated DeltaNet against independent references: a float64 numpy recurrence and the l2-norm / decay
formulas written out, for what ``test_gated_delta.py`` (chunked vs recurrent on the same inputs) cannot
see: the q/k normalisation itself, and chunk sizes whose inverse needs every squaring step."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from streamer.models.gated_delta import compute_g, gated_delta_chunked, normalize_qk


def _recurrence_f64(q, k, v, g, beta):
    """The rule token by token in float64 (numpy), from a zero state; q, k already at Hv heads."""
    B, T, H, Dk = q.shape
    state = np.zeros((B, H, v.shape[-1], Dk))
    out = np.zeros(v.shape)
    for t in range(T):
        state = state * g[:, t, :, None, None]
        u = beta[:, t, :, None] * (v[:, t] - np.einsum("bhvk,bhk->bhv", state, k[:, t]))
        state = state + u[..., None] * k[:, t, :, None, :]
        out[:, t] = np.einsum("bhvk,bhk->bhv", state, q[:, t])
    return out, state


def test_normalize_qk_is_the_l2_norm_with_its_eps_and_the_read_out_scale():
    rng = np.random.default_rng(3)
    Dk = 32
    q = rng.standard_normal((2, 5, 3, Dk))  # T = 5, Dk = 32: a shape mix-up changes the scale
    k = rng.standard_normal((2, 5, 3, Dk))
    # Rows with |x| = 1e-3: sum(x^2) = 1e-6 equals eps, so they come out as x / sqrt(2e-6), which pins
    # eps and where it is added (to sum(x^2), not to mean(x^2)).
    q[0, 0, 0] *= 1e-3 / np.linalg.norm(q[0, 0, 0])
    k[1, 4, 2] *= 1e-3 / np.linalg.norm(k[1, 4, 2])
    eps = 1e-6
    want_q = q / np.sqrt((q**2).sum(-1, keepdims=True) + eps) * Dk**-0.5
    want_k = k / np.sqrt((k**2).sum(-1, keepdims=True) + eps)
    got_q, got_k = normalize_qk(mx.array(q.astype(np.float32)), mx.array(k.astype(np.float32)))
    np.testing.assert_allclose(np.array(got_q), want_q, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.array(got_k), want_k, rtol=1e-5, atol=1e-7)
    # The tiny rows really sit where eps matters: without it they would be unit vectors.
    assert abs(np.linalg.norm(np.array(got_k)[1, 4, 2]) - 1 / np.sqrt(2)) < 1e-4


def test_compute_g_is_the_decay_formula():
    rng = np.random.default_rng(4)
    A_log = np.log(rng.uniform(0.5, 16.0, 4))
    a = rng.standard_normal((2, 7, 4)) * 3
    dt_bias = rng.standard_normal(4)
    want = np.exp(-np.exp(A_log) * np.log1p(np.exp(a + dt_bias)))
    f32 = np.float32
    got = compute_g(mx.array(A_log.astype(f32)), mx.array(a.astype(f32)), mx.array(dt_bias.astype(f32)))
    np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize("chunk_size", [3, 5, 16])
def test_chunked_equals_a_float64_recurrence_with_aligned_keys(chunk_size):
    """Nearly parallel keys with g = 1 keep the within-chunk terms (k_t . k_s) large, so the inverse of
    (I + A) needs its every power up to the chunk size; chunk sizes that are not powers of two too."""
    rng = np.random.default_rng(5)
    B, T, Hk, Hv, Dk, Dv = 1, 40, 1, 2, 8, 4
    k = rng.standard_normal((1, 1, Hk, Dk)) + 0.05 * rng.standard_normal((B, T, Hk, Dk))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    q = rng.standard_normal((B, T, Hk, Dk)) * Dk**-0.5
    v = rng.standard_normal((B, T, Hv, Dv))
    g = np.ones((B, T, Hv))
    g[:, :, 1] = 0.97
    beta = np.full((B, T, Hv), 0.3)
    want_o, want_s = _recurrence_f64(np.repeat(q, 2, axis=2), np.repeat(k, 2, axis=2), v, g, beta)
    f32 = [mx.array(x.astype(np.float32)) for x in (q, k, v, g, beta)]
    o, s = gated_delta_chunked(*f32, chunk_size=chunk_size)
    assert o.shape == want_o.shape and s.shape == want_s.shape
    np.testing.assert_allclose(np.array(o), want_o, atol=2e-6)
    np.testing.assert_allclose(np.array(s), want_s, atol=2e-6)
