"""The batching scheduler: every sequence of a batch gets exactly the tokens it gets alone.

The reference for each sequence is the same request run alone (a batch of one, whose tokens other tests
compare with mlx-lm). Batches here have staggered joins, different prompt lengths, cancellations,
sequences restored from a snapshot, small and full expert caches and both I/O modes (float32, greedy).
One test breaks the batching on purpose and shows the comparison catches it.
"""

from __future__ import annotations

import errno

import mlx.core as mx
import pytest

from streamer.errors import StreamerError
from streamer.generation.generate import stream_generate
from streamer.generation.sampling import SamplingParams, make_sampler
from streamer.generation.scheduler import GenSequence, MemoryBudgetError, Scheduler
from streamer.loader import load_engine
from streamer.models import layer_cache
from streamer.models.layer_cache import restore_caches, snapshot_caches
from streamer.settings import RuntimeConfig
from streamer.storage.repack import run_repack
from streamer.storage.repack_plan import make_plan
from streamer.synthetic.writer import generate

GREEDY = SamplingParams()
# Different lengths; the third is long enough to take several prefill chunks of 8.
PROMPTS = [
    [5, 77, 301, 12, 9],
    [44, 500, 3],
    [18, 250, 61, 7, 99, 140, 8, 2, 31, 64, 128, 256, 33, 17, 11, 90, 45, 300, 21, 6],
    [400, 401],
]
N_TOKENS = 10


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("scheduler")
    src = generate(root / "src", "like-35b", dtype="float32", seed=5)
    run_repack(make_plan(src, root / "packed"))
    return root / "packed"


@pytest.fixture(scope="module")
def engine(packed):
    with load_engine(packed) as e:
        yield e


@pytest.fixture(scope="module")
def solo(engine):
    """Each prompt's greedy tokens, run alone."""
    return [_alone(engine, p) for p in PROMPTS]


def _alone(engine, prompt, max_tokens=N_TOKENS):
    tokens = stream_generate(engine.model, _NoEos(), prompt, make_sampler(GREEDY), max_tokens)
    return [r.token for r in tokens]


class _NoEos:
    """A tokenizer stand-in: no end-of-sequence ids (random weights may emit any id), plain detokenizer."""

    eos_token_ids = frozenset()

    def detokenizer(self):
        return _Detok()


class _Detok:
    def add(self, token):
        return ""

    def finalize(self):
        return ""


def _seq(engine, prompt, max_tokens=N_TOKENS, **kwargs):
    return GenSequence(list(prompt), make_sampler(GREEDY), max_tokens, engine.model.make_cache(), **kwargs)


def _run(scheduler, joins):
    """Runs the scheduler; ``joins`` maps a step number to the sequences that join before it."""
    step = 0
    while scheduler.busy or any(k >= step for k in joins):
        for seq in joins.get(step, []):
            scheduler.add(seq)
        scheduler.step()
        step += 1


def test_staggered_batch_equals_each_sequence_alone(engine, solo):
    scheduler = Scheduler(engine.model, max_batch=4, prefill_chunk=8)
    seqs = [_seq(engine, p) for p in PROMPTS]
    _run(scheduler, {0: seqs[:2], 3: [seqs[2]], 7: [seqs[3]]})
    for seq, want in zip(seqs, solo, strict=True):
        assert seq.finish_reason == "length"
        assert seq.tokens == want
    assert scheduler.largest_batch == 4


def test_a_broken_batch_is_caught(engine, solo, monkeypatch):
    """Rows attend over the wrong sequence's KV cache: the same comparison must fail."""
    real = layer_cache.batch_caches

    def swapped(caches):
        layers = real(caches)
        for layer in layers:
            if isinstance(layer, layer_cache.KVBatch):
                layer.members.reverse()
        return layers

    monkeypatch.setattr("streamer.generation.scheduler.batch_caches", swapped)
    scheduler = Scheduler(engine.model, max_batch=4, prefill_chunk=8)
    seqs = [_seq(engine, p) for p in PROMPTS]
    _run(scheduler, {0: seqs})
    assert [s.tokens for s in seqs] != solo


@pytest.mark.parametrize("io_mode", ["buffered", "direct"])
@pytest.mark.parametrize("cache_experts", [8, 40, None])  # one layer's top-k .. every expert
def test_batches_equal_alone_for_cache_sizes_and_io_modes(packed, solo, io_mode, cache_experts):
    config = RuntimeConfig(cache_experts=cache_experts, io_mode=io_mode)
    with load_engine(packed, config) as engine:
        scheduler = Scheduler(engine.model, max_batch=3, prefill_chunk=16)
        seqs = [_seq(engine, p) for p in PROMPTS]
        _run(scheduler, {0: seqs[:3], 2: seqs[3:]})
        stats = engine.stats()
    assert [s.tokens for s in seqs] == solo
    assert stats["cache_misses"] > 0
    assert scheduler.largest_batch == 3


def test_cancelled_sequences_leave_and_the_rest_are_unchanged(engine, solo):
    scheduler = Scheduler(engine.model, max_batch=4, prefill_chunk=8)
    seqs = [_seq(engine, p) for p in PROMPTS]
    finished = []
    for s in seqs:
        s.on_finish = finished.append
    waiting = _seq(engine, PROMPTS[0])
    for s in seqs:
        scheduler.add(s)
    scheduler.add(waiting)  # beyond max_batch: still waiting when cancelled
    for _ in range(5):
        scheduler.step()
    seqs[1].cancel()
    waiting.cancel()
    _run(scheduler, {})
    assert seqs[1].finish_reason == "cancelled" and 0 < len(seqs[1].tokens) < N_TOKENS
    assert seqs[1].tokens == solo[1][: len(seqs[1].tokens)]
    assert waiting.finish_reason == "cancelled" and waiting.tokens == []
    for i in (0, 2, 3):
        assert seqs[i].tokens == solo[i]
    assert sorted(map(id, finished)) == sorted(map(id, seqs))


def test_a_sequence_resumed_from_a_snapshot_joins_a_batch(engine, solo):
    """A prompt whose first part is restored from a snapshot (a prefix-cache hit) decodes as if whole."""
    prompt = PROMPTS[2]
    cache = engine.model.make_cache()
    first = _seq(engine, prompt[:12], max_tokens=1)
    first.cache = cache
    runner = Scheduler(engine.model)
    runner.add(first)
    runner.run_until_done()
    snapshot = snapshot_caches(cache)  # the state after prompt[:12] (the sampled token was never fed)

    resumed_cache = engine.model.make_cache()
    restore_caches(resumed_cache, snapshot)
    resumed = GenSequence(prompt[12:], make_sampler(GREEDY), N_TOKENS, resumed_cache)
    others = [_seq(engine, p) for p in (PROMPTS[0], PROMPTS[1])]
    scheduler = Scheduler(engine.model, max_batch=3, prefill_chunk=4)
    _run(scheduler, {0: others, 2: [resumed]})
    assert resumed.tokens == solo[2]
    assert [s.tokens for s in others] == solo[:2]


class _CountingModel:
    """The real model; counts calls and the tokens each call runs."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, tokens, cache=None, **kwargs):
        self.calls.append(tokens.shape)
        return self.model(tokens, cache=cache, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def test_a_burst_of_prompts_is_prefilled_in_one_call_and_stays_exact(engine, solo):
    counting = _CountingModel(engine.model)
    scheduler = Scheduler(counting, max_batch=4, prefill_chunk=64)
    seqs = [_seq(engine, p) for p in PROMPTS]
    _run(scheduler, {0: seqs})
    assert counting.calls[0] == (1, sum(map(len, PROMPTS)))  # every prompt end to end in one row
    assert counting.calls[1] == (4, 1)  # then they all decode together
    assert [s.tokens for s in seqs] == solo


def test_prefill_budget_keeps_each_prompt_cut_as_alone(engine, solo):
    """Pieces never exceed the budget in all, and each prompt is cut at its own chunk boundaries."""
    counting = _CountingModel(engine.model)
    scheduler = Scheduler(counting, max_batch=4, prefill_chunk=8)
    seqs = [_seq(engine, p) for p in PROMPTS]
    _run(scheduler, {0: seqs})
    prefill_calls = [shape[1] for shape in counting.calls if shape[0] == 1 and shape[1] > 1]
    assert max(prefill_calls) <= 8
    assert [s.tokens for s in seqs] == solo


def test_choices_of_one_request_share_one_prefill_and_equal_their_own_runs(engine):
    """n choices: the followers adopt the leader's prompt state; each equals a lone run with its seed."""
    prompt = PROMPTS[2]
    params = [SamplingParams(temperature=1.0, seed=s) for s in (7, 8, 9)]

    def alone(p):
        tokens = stream_generate(engine.model, _NoEos(), prompt, make_sampler(p), N_TOKENS)
        return [r.token for r in tokens]

    want = [alone(p) for p in params]
    assert len({tuple(w) for w in want}) == 3  # the seeds really give different answers
    counting = _CountingModel(engine.model)
    scheduler = Scheduler(counting, max_batch=4, prefill_chunk=8)
    leader = GenSequence(list(prompt), make_sampler(params[0]), N_TOKENS, engine.model.make_cache())
    followers = [
        GenSequence(list(prompt), make_sampler(p), N_TOKENS, engine.model.make_cache(), follows=leader)
        for p in params[1:]
    ]
    _run(scheduler, {0: [leader, *followers]})
    assert [s.tokens for s in (leader, *followers)] == want
    assert [s.adopted for s in followers] == [True, True]
    prefilled = sum(shape[1] for shape in counting.calls if shape[0] == 1)
    assert prefilled == len(prompt)  # read once, in chunks of 8, for all three


def test_followers_of_a_cancelled_leader_read_their_own_prompt(engine, solo):
    scheduler = Scheduler(engine.model, max_batch=4, prefill_chunk=4)
    leader = _seq(engine, PROMPTS[2])
    follower = _seq(engine, PROMPTS[2], follows=leader)
    scheduler.add(leader)
    scheduler.add(follower)
    scheduler.step()  # the leader has read one chunk of 4
    leader.cancel()
    _run(scheduler, {})
    assert leader.finish_reason == "cancelled"
    assert not follower.adopted and follower.tokens == solo[2]


def test_prefill_chunks_interleave_with_running_decodes(engine):
    """While a long prompt is read chunk by chunk, a running sequence still gets one token per step."""
    scheduler = Scheduler(engine.model, max_batch=2, prefill_chunk=4)
    running = _seq(engine, PROMPTS[1], max_tokens=30)
    scheduler.add(running)
    scheduler.step()
    scheduler.step()
    long = _seq(engine, PROMPTS[2] * 2)  # 40 tokens: 10 chunks of 4
    chunks = []
    long.on_prefill = lambda seq, done, total: chunks.append(len(running.tokens))
    scheduler.add(long)
    while long.prefilling:
        scheduler.step()
    assert len(chunks) == 10
    assert chunks == list(range(chunks[0], chunks[0] + 10))  # one decode step per chunk


def test_boundaries_pause_the_prefill_with_the_cache_at_that_length(engine):
    seen = []

    def at(seq, n):
        seen.append((n, {c.offset for c in seq.cache}))

    seq = _seq(engine, PROMPTS[2], boundaries=[5, 13], on_boundary=at)
    scheduler = Scheduler(engine.model, prefill_chunk=8)
    scheduler.add(seq)
    scheduler.run_until_done()
    assert seen == [(5, {5}), (13, {13})]


def test_memory_budget_caps_the_batch_and_queues_the_rest(engine, solo):
    one = engine.model.state_bytes(len(PROMPTS[2]) + N_TOKENS)
    scheduler = Scheduler(engine.model, max_batch=8, prefill_chunk=8, max_state_bytes=2 * one)
    seqs = [_seq(engine, p) for p in PROMPTS]
    _run(scheduler, {0: seqs})
    assert scheduler.largest_batch == 2
    assert [s.tokens for s in seqs] == solo
    assert scheduler.reserved_bytes == 0
    with pytest.raises(MemoryBudgetError, match="budget"):
        scheduler.add(_seq(engine, list(range(3, 3000)), max_tokens=10_000))


def test_state_bytes_matches_the_caches_it_describes(engine):
    """The budget's per-sequence estimate against the bytes real caches hold after a prefill."""
    cache = engine.model.make_cache()
    seq = GenSequence(PROMPTS[2], make_sampler(GREEDY), 1, cache)
    runner = Scheduler(engine.model)
    runner.add(seq)
    runner.run_until_done()
    held = sum(a.nbytes for c in cache for a in c.state)
    assert held == engine.model.state_bytes(len(PROMPTS[2]))


def test_a_failing_step_fails_only_its_sequences(engine, solo, monkeypatch):
    """An exception in one sequence's sampler ends that sequence with "error"; the batch goes on."""
    scheduler = Scheduler(engine.model, max_batch=4, prefill_chunk=8)
    seqs = [_seq(engine, p) for p in PROMPTS[:3]]
    calls = {"n": 0}
    real = seqs[1].sampler

    def flaky(logits: mx.array) -> int:
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("sampler broke")
        return real(logits)

    seqs[1].sampler = flaky
    _run(scheduler, {0: seqs})
    assert seqs[1].finish_reason == "error" and "sampler broke" in str(seqs[1].error)
    assert seqs[0].tokens == solo[0] and seqs[2].tokens == solo[2]


def test_each_layer_reads_the_union_of_the_batch_once_per_step(packed):
    """One routing decision per layer per decode step, for all rows together (not one per sequence)."""
    with load_engine(packed, RuntimeConfig(cache_experts=40)) as engine:
        calls = []
        engine.runtime.on_route = lambda layer, ids: calls.append((layer, ids.shape[0]))
        scheduler = Scheduler(engine.model, max_batch=4, prefill_chunk=64)
        seqs = [_seq(engine, p, max_tokens=8) for p in PROMPTS]
        _run(scheduler, {0: seqs})
    layers = engine.args.num_hidden_layers
    decode_calls = [rows for _, rows in calls if rows > 1 and rows <= 4]
    # The 3 decode steps after every prompt was read route 4 rows at once in every layer.
    assert decode_calls.count(4) >= 3 * layers


def test_a_failed_expert_read_fails_the_batch_that_needed_it_and_the_next_batch_is_clean(packed, solo):
    """A read error mid-batch fails every row of that model call (their state is unknown), cleanly."""
    with load_engine(packed, RuntimeConfig(cache_experts=8)) as engine:
        armed = {"on": False}

        def fault(layer, expert):
            if armed["on"]:
                armed["on"] = False
                raise OSError(errno.EIO, "injected")

        engine.runtime.store.fault = fault
        scheduler = Scheduler(engine.model, max_batch=3, prefill_chunk=64)
        seqs = [_seq(engine, p) for p in PROMPTS[:3]]
        for s in seqs:
            scheduler.add(s)
        while scheduler.decode_steps < 2 or any(s.prefilling for s in seqs):
            scheduler.step()
        armed["on"] = True
        scheduler.run_until_done()
        assert [s.finish_reason for s in seqs] == ["error"] * 3
        assert all(isinstance(s.error, StreamerError) and "injected" in str(s.error) for s in seqs)
        assert engine.runtime.cache.pinned_count() == 0
        again = [_seq(engine, p) for p in PROMPTS[:3]]
        _run(scheduler, {0: again})
    assert [s.tokens for s in again] == solo[:3]


# ---------------------------------------------------------------------------------------------------------
# Pipelining: the next decode step is built on this one's lazy greedy ids while this one computes.


@pytest.fixture(scope="module")
def resident(packed):
    """The same model with every expert resident: a decode step is one lazy graph, so steps pipeline."""
    with load_engine(packed.parent / "src", resident=True) as e:
        yield e


def _offsets(seq) -> set[int]:
    return {c.offset for c in seq.cache}


@pytest.mark.parametrize("max_batch", [1, 4])
def test_pipelined_steps_give_the_same_tokens_and_leave_exact_caches(resident, solo, max_batch):
    scheduler = Scheduler(resident.model, max_batch=max_batch, prefill_chunk=64)
    seqs = [_seq(resident, p, max_tokens=N_TOKENS + i) for i, p in enumerate(PROMPTS)]
    _run(scheduler, {0: seqs})
    assert scheduler.pipelined_steps > 0
    for i, seq in enumerate(seqs):
        assert seq.tokens[:N_TOKENS] == solo[i]
        # The last sampled token is never fed: a step built ahead for it was undone.
        assert _offsets(seq) == {len(seq.prompt) + len(seq.tokens) - 1}


def test_a_stop_and_a_consumer_that_leaves_undo_the_step_built_ahead(resident, solo):
    scheduler = Scheduler(resident.model, max_batch=2, prefill_chunk=64)
    stopped = _seq(resident, PROMPTS[0], max_tokens=100)
    stopped.on_token = lambda seq, token, reason: seq.stop() if len(seq.tokens) == 5 else None
    other = _seq(resident, PROMPTS[1], max_tokens=100)
    scheduler.add(stopped)
    scheduler.add(other)
    while not stopped.done:
        scheduler.step()
    assert stopped.tokens == solo[0][:5] and _offsets(stopped) == {len(PROMPTS[0]) + 4}
    assert scheduler.pipelined_steps > 0
    other.cancel()
    scheduler.step()
    assert _offsets(other) == {len(PROMPTS[1]) + len(other.tokens) - 1}

    cache = resident.model.make_cache()
    stream = stream_generate(resident.model, _NoEos(), PROMPTS[2], make_sampler(GREEDY), 50, cache=cache)
    got = [next(stream).token for _ in range(6)]
    stream.close()
    assert got == solo[2][:6] and {c.offset for c in cache} == {len(PROMPTS[2]) + 5}


def test_pipelining_off_gives_the_same(resident, solo):
    scheduler = Scheduler(resident.model, max_batch=4, prefill_chunk=64, pipeline=False)
    seqs = [_seq(resident, p) for p in PROMPTS]
    _run(scheduler, {0: seqs})
    assert scheduler.pipelined_steps == 0 and [s.tokens for s in seqs] == solo
