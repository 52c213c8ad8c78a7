"""The chunked gated delta rule equals the recurrent one, and the recurrent one equals mlx-lm's."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from streamer.models.gated_delta import compute_g, gated_delta_chunked, gated_delta_recurrent, normalize_qk

# Lengths around chunk boundaries (chunk sizes 16 and 64 below) up to 300.
LENGTHS = [1, 2, 3, 15, 16, 17, 31, 63, 64, 65, 100, 127, 128, 129, 191, 255, 256, 257, 299, 300]


def _inputs(T, *, B=1, Hk=2, Hv=4, Dk=32, Dv=16, seed=0, with_state=False):
    """Random inputs shaped like a DeltaNet layer's: normalised q/k, decays from A_log / a / dt_bias."""
    rng = np.random.default_rng([seed, T])

    def normal(*shape):
        return mx.array(rng.standard_normal(shape, dtype=np.float32))

    q, k = normalize_qk(normal(B, T, Hk, Dk), normal(B, T, Hk, Dk))
    A_log = mx.array(np.log(rng.uniform(1.0, 16.0, Hv)).astype(np.float32))
    g = compute_g(A_log, normal(B, T, Hv), 1.0 + 0.1 * normal(Hv))
    beta = mx.sigmoid(normal(B, T, Hv))
    state = 0.3 * normal(B, Hv, Dv, Dk) if with_state else None
    return q, k, normal(B, T, Hv, Dv), g, beta, state


def _max_diff(a, b):
    return mx.abs(a - b).max().item()


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("T", LENGTHS)
def test_chunked_equals_recurrent(T, with_state):
    q, k, v, g, beta, state = _inputs(T, with_state=with_state)
    o_ref, s_ref = gated_delta_recurrent(q, k, v, g, beta, state)
    for chunk_size in (16, 64):
        o, s = gated_delta_chunked(q, k, v, g, beta, state, chunk_size=chunk_size)
        assert o.shape == o_ref.shape and s.shape == s_ref.shape
        assert _max_diff(o, o_ref) < 1e-5, f"outputs, chunk {chunk_size}"
        assert _max_diff(s, s_ref) < 1e-5, f"state, chunk {chunk_size}"


def test_chunked_equals_recurrent_batched_slow_decay():
    # g close to 1 and beta close to 1 keep the whole history in the state: the hardest case for
    # the chunk-local inverse. Batch 2 and 1:1 heads cover the other shapes.
    q, k, v, _, _, state = _inputs(150, B=2, Hk=4, Hv=4, with_state=True)
    g = mx.full(q.shape[:3], 0.999)
    beta = mx.full(q.shape[:3], 0.99)
    o_ref, s_ref = gated_delta_recurrent(q, k, v, g, beta, state)
    o, s = gated_delta_chunked(q, k, v, g, beta, state)
    assert _max_diff(o, o_ref) < 1e-5
    assert _max_diff(s, s_ref) < 1e-5


def test_chunked_survives_decay_underflow():
    # Decays of e^-40 per token underflow the cumulative product within a chunk; nothing may turn NaN.
    q, k, v, _, beta, state = _inputs(130, with_state=True)
    g = mx.full(q.shape[:2] + (v.shape[2],), float(np.exp(-40.0)))
    o_ref, s_ref = gated_delta_recurrent(q, k, v, g, beta, state)
    o, s = gated_delta_chunked(q, k, v, g, beta, state)
    assert mx.all(mx.isfinite(o)).item() and mx.all(mx.isfinite(s)).item()
    assert _max_diff(o, o_ref) < 1e-5
    assert _max_diff(s, s_ref) < 1e-5


def test_chunked_can_fail():
    # The comparison above is sensitive: dropping one token's write changes the outputs.
    q, k, v, g, beta, _ = _inputs(80)
    o_ref, _ = gated_delta_recurrent(q, k, v, g, beta)
    beta_broken = mx.concatenate([beta[:, :40], mx.zeros_like(beta[:, 40:41]), beta[:, 41:]], axis=1)
    o, _ = gated_delta_chunked(q, k, v, g, beta_broken)
    assert _max_diff(o, o_ref) > 1e-3


def test_recurrent_is_mlx_lm_ops_bit_for_bit():
    ref = pytest.importorskip("mlx_lm.models.gated_delta")
    for with_state in (False, True):
        q, k, v, g, beta, state = _inputs(37, with_state=with_state)
        o_ref, s_ref = ref.gated_delta_ops(q, k, v, g, beta, state)
        o, s = gated_delta_recurrent(q, k, v, g, beta, state)
        assert mx.array_equal(o, o_ref).item() and mx.array_equal(s, s_ref).item()
