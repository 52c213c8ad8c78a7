"""The cache simulators: hand-computed sequences, the real ExpertCache's hit count, trace parsing."""

from __future__ import annotations

import json
import random

import pytest

from streamer.experts.expert_cache import ExpertCache, block_shape
from streamer.experts.policy import POLICIES
from streamer.tuning.cache_sim import (
    Step,
    TraceError,
    make_step,
    read_trace,
    simulate,
    simulate_lfu,
    simulate_lru,
    simulate_optimal,
)

# The textbook example (Silberschatz, Operating System Concepts): 20 references, 3 frames.
CLASSIC = [7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1]


def _single(seq, layer=0):
    return [Step(layer, (e,), 1) for e in seq]


def test_classic_example_lru_12_faults_optimal_9():
    assert simulate_lru(_single(CLASSIC), 3).misses == 12
    assert simulate_optimal(_single(CLASSIC), 3).misses == 9
    assert simulate_optimal(_single(CLASSIC), 3).hits == 11


def test_small_sequences_by_hand():
    # 1 2 3 1 4 1 2 with 2 slots. LRU: 1m 2m 3m(ev 1) 1m(ev 2) 4m(ev 3) 1h 2m(ev 4) -> 1 hit.
    # MIN: 1m 2m 3m(ev 2: used last) 1h 4m(ev 3: never again) 1h 2m -> 2 hits.
    seq = [1, 2, 3, 1, 4, 1, 2]
    assert simulate_lru(_single(seq), 2).hits == 1
    assert simulate_optimal(_single(seq), 2).hits == 2
    # With room for everything only compulsory misses remain.
    assert simulate_lru(_single(seq), 4).misses == 4
    assert simulate_optimal(_single(seq), 4).misses == 4


def test_lfu_keeps_the_popular_expert():
    # 1 is used often; 2, 3, 4 once each. 2 slots: LFU keeps 1 (hits at the end), LRU loses it to 3 and 4.
    seq = [1, 1, 1, 2, 3, 4, 1]
    assert simulate_lfu(_single(seq), 2).hits == 3
    assert simulate_lru(_single(seq), 2).hits == 2
    # Counts survive eviction: 5 (used twice before) beats 6 and 7 (once) when it returns.
    seq = [5, 5, 6, 7, 5, 6, 5]
    assert simulate_lfu(_single(seq), 2).hits == 3


def test_layers_are_distinct_keys_and_pools_are_separate():
    steps = [Step(0, (1,), 1), Step(1, (1,), 1), Step(0, (1,), 1), Step(1, (1,), 1)]
    assert simulate_lru(steps, 1).hits == 0  # one shared slot: the layers evict each other
    assert simulate_lru(steps, 2).hits == 2
    per_pool = simulate_lru(steps, {"a": 1, "b": 1}, pool_of_layer={0: "a", 1: "b"})
    assert per_pool.hits == 2


def test_a_step_wider_than_the_pool_runs_in_batches():
    # 4 distinct experts through 2 slots: batches (0, 1) and (2, 3), all misses; then (0, 1) again misses.
    steps = [Step(0, (0, 1, 2, 3), 5), Step(0, (0, 1), 1)]
    r = simulate_lru(steps, 2)
    assert (r.prefill_misses, r.decode_misses, r.decode_hits) == (4, 2, 0)
    assert simulate_optimal(steps, 2).decode_hits == 0  # the batches force it too


def test_decode_and_prefill_are_counted_apart():
    steps = [make_step(0, [[1, 2], [2, 3]]), make_step(0, [[1, 2]]), make_step(0, [[3, 4]])]
    r = simulate_lru(steps, 8)
    assert (r.prefill_hits, r.prefill_misses) == (0, 3)
    assert (r.decode_hits, r.decode_misses) == (3, 1)
    assert r.decode_hit_rate == 0.75
    assert r.misses_by_layer == {0: 1}


def test_optimal_never_below_lru_on_random_streams():
    rng = random.Random(1)
    steps = [make_step(layer, [rng.sample(range(16), 4)]) for _ in range(60) for layer in range(3)]
    for slots in (4, 6, 12, 24, 48):
        lru, opt = simulate_lru(steps, slots), simulate_optimal(steps, slots)
        assert opt.hits >= lru.hits
        assert simulate_lru(steps, slots, lookup_first=True).hits <= opt.hits
        assert simulate_lfu(steps, slots).hits <= opt.hits


def test_a_miss_can_evict_an_expert_the_same_step_needs():
    # Slots hold 5 (older) and 1; the step needs 0 and 5: 0 misses first and evicts 5, then 5 misses too.
    steps = [Step(0, (5,), 1), Step(0, (1,), 1), Step(0, (0, 5), 1)]
    assert simulate_lru(steps, 2, lookup_first=False).decode_hits == 0
    assert simulate_lru(steps, 2).decode_hits == 1


# ---- against the real ExpertCache --------------------------------------------------------------


def _shape():
    comps = []
    for name in ("gate_proj", "up_proj", "down_proj"):
        comps += [(f"{name}.weight", "U32", (8, 8)), (f"{name}.scales", "F32", (8, 1))]
    return block_shape(comps)


def _real_cache_hits(steps, slots, layers, experts, policy) -> int:
    """Drives ExpertCache exactly as ExpertRuntime.begin / finish / release do (parallel prefetch)."""
    shape = _shape()
    cache = ExpertCache(
        {l: shape for l in range(layers)},
        {l: experts for l in range(layers)},
        slots * shape.nbytes,
        1,
        policy=policy,
    )
    hits = 0
    for step in steps:
        for start in range(0, len(step.experts), slots):
            got, pending, misses = {}, [], []
            for e in step.experts[start : start + slots]:  # hits first, as ExpertRuntime.begin
                if (slot := cache.lookup(step.layer, e)) is not None:
                    cache.pin(step.layer, [slot])
                    hits += 1
                    got[e] = slot
                else:
                    misses.append(e)
            for e in misses:
                slot = cache.allocate(step.layer, e)
                pending.append((e, slot))
                got[e] = slot
            for e, slot in pending:
                cache.commit(step.layer, e, slot)
            cache.unpin(step.layer, got.values())
    return hits


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("slots", [4, 7, 16, 40, 96])
def test_simulator_equals_the_real_expert_cache(slots, policy):
    rng = random.Random(slots)
    layers, experts, k = 4, 24, 4
    steps = [make_step(layer, [rng.sample(range(experts), k) for _ in range(9)]) for layer in range(layers)]
    for _ in range(80):
        # Skewed routing (some experts popular) so every capacity sees a mix of hits and misses.
        steps += [
            make_step(layer, [rng.sample(range(experts // 2), k // 2) + rng.sample(range(12, 24), k // 2)])
            for layer in range(layers)
        ]
    steps += [make_step(0, [rng.sample(range(6), 3)]) for _ in range(30)]  # one layer: hits even in 4 slots
    want = _real_cache_hits(steps, slots, layers, experts, policy)
    assert simulate(steps, slots, policy=policy).hits == want
    assert 0 < want < sum(len(s.experts) for s in steps)


# ---- trace files ------------------------------------------------------------------------------


def test_read_trace_parses_records(tmp_path):
    path = tmp_path / "t.jsonl"
    rows = [
        {"pos": 0, "layer": 0, "experts": [[3, 1], [1, 2]]},
        {"pos": 0, "layer": 1, "experts": [[0, 1], [0, 1]]},
        {"pos": 2, "layer": 0, "experts": [[1, 3]]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    assert read_trace(path) == [Step(0, (1, 2, 3), 2), Step(1, (0, 1), 2), Step(0, (1, 3), 1)]


def test_read_trace_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(TraceError, match="no such trace file.*--trace"):
        read_trace(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(TraceError, match="empty"):
        read_trace(empty)
    bad_lines = ["not json", '{"layer": 0}', '{"layer": -1, "experts": [[1]]}']
    bad_lines += ['{"layer": 0, "experts": [1]}', '{"layer": 0, "experts": [[true]]}']
    for bad in bad_lines:
        path = tmp_path / "bad.jsonl"
        path.write_text('{"pos": 0, "layer": 0, "experts": [[1]]}\n' + bad + "\n")
        with pytest.raises(TraceError, match="bad.jsonl line 2: not a routing record"):
            read_trace(path)
