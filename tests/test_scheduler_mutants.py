"""The scheduler and the generation loop on a toy model whose every next token is known in advance.

The toy model keeps real layer caches (a ``KVCache`` holding the token ids fed, a ``DeltaNetCache``
holding a running hash of them) and computes everything lazily with MLX ops, so batching, ragged prefill,
snapshots and pipelining all run as with a real model. Its logits peak at ``next_id(history)``, a plain
Python function of the tokens fed so far: the expected tokens of any sequence are computed here without
the scheduler. Every test takes well under a second (no checkpoint, no repack).
"""

from __future__ import annotations

import itertools
import logging

import mlx.core as mx
import numpy as np
import pytest

from streamer.generation import scheduler as scheduler_module
from streamer.generation.generate import GenerationResponse, prefill, stream_generate, token_text
from streamer.generation.sampling import SamplingParams, TokenSampler, make_sampler
from streamer.generation.scheduler import GenSequence, MemoryBudgetError, Scheduler
from streamer.models.layer_cache import DeltaNetCache, KVBatch, KVCache, RaggedBatch

V = 61  # vocabulary
GREEDY = SamplingParams()


def _hash(history):
    h = 0
    for t in history:
        h = (h * 5 + t + 1) % 1009
    return h


def next_id(history: list[int]) -> int:
    """The toy model's greedy next token after ``history`` (every token fed so far)."""
    return (_hash(history) * 7 + sum(history) * 3 + len(history)) % V


def toy_logits(history: list[int]) -> np.ndarray:
    """The toy model's logits after ``history``: highest at next_id, falling off with the distance."""
    return -0.3 * np.abs(np.arange(V) - next_id(history)).astype(np.float32)


def greedy_after(history: list[int], n: int) -> list[int]:
    out = []
    for _ in range(n):
        out.append(next_id(history + out))
    return out


class ToyModel:
    """``model(tokens [B, L], cache, last_only) -> logits``, as the real model's interface."""

    def __init__(self, lazy: bool = True):
        self.lazy = lazy
        self.calls: list[tuple[int, int]] = []  # the shape of each call's tokens
        self.last_only: list[bool] = []  # each call's last_only
        self.kinds: list[str] = []  # each call's first layer cache type: KVCache (own) or a batch

    def make_cache(self):
        return [KVCache(), DeltaNetCache()]

    def state_bytes(self, tokens: int) -> int:
        return (1 + tokens) * 2**20

    def decode_is_lazy(self) -> bool:
        return self.lazy

    def __call__(self, tokens, cache, last_only=False):
        self.calls.append(tuple(tokens.shape))
        self.last_only.append(last_only)
        kv, dn = cache[0], cache[1]
        self.kinds.append(type(kv).__name__)
        if isinstance(kv, RaggedBatch):  # prompts end to end along one row
            out, start = [], 0
            for n, kv_m, dn_m in zip(kv.lengths, kv.members, dn.members, strict=True):
                logits = self._one(tokens[:, start : start + n], kv_m, dn_m)
                out.append(logits[:, -1:] if last_only else logits)
                start += n
            return mx.concatenate(out, axis=1)
        if isinstance(kv, KVBatch):  # one row per sequence
            rows = [
                self._one(tokens[i : i + 1], kv_m, dn_m)
                for i, (kv_m, dn_m) in enumerate(zip(kv.members, dn.members, strict=True))
            ]
            logits = mx.concatenate(rows, axis=0)
        else:
            logits = self._one(tokens, kv, dn)
        return logits[:, -1:] if last_only else logits

    @staticmethod
    def _one(tokens, kv: KVCache, dn: DeltaNetCache):
        """One sequence's tokens [1, L]: appends them to its caches, returns logits [1, L, V]."""
        start = kv.offset
        ids = tokens.astype(mx.float32).reshape(1, 1, -1, 1)
        keys, _ = kv.update_and_fetch(ids, ids)
        sums = mx.cumsum(keys.reshape(-1).astype(mx.int32))[start:]  # sum of the history at each position
        h = dn.recurrent_state if dn.recurrent_state is not None else mx.zeros((1,), mx.int32)
        hashes = []
        for j in range(tokens.shape[1]):
            h = (h * 5 + tokens[0, j : j + 1].astype(mx.int32) + 1) % 1009
            hashes.append(h)
        dn.update(h, h, tokens.shape[1])
        positions = mx.arange(start + 1, kv.offset + 1)
        nxt = (mx.concatenate(hashes) * 7 + sums * 3 + positions) % V  # [L]
        return (-0.3 * mx.abs(mx.arange(V)[None, :] - nxt[:, None]).astype(mx.float32))[None]


def _seq(model, prompt, max_tokens=6, params=GREEDY, **kwargs):
    return GenSequence(list(prompt), make_sampler(params), max_tokens, model.make_cache(), **kwargs)


def _offsets(seq):
    return {c.offset for c in seq.cache}


def _run(scheduler, joins):
    """Runs the scheduler; ``joins`` maps a step number to the sequences that join before it."""
    for step in itertools.count():
        for seq in joins.get(step, []):
            scheduler.add(seq)
        if not scheduler.busy and step >= max(joins, default=0):
            return
        scheduler.step()


PROMPTS = [[5, 17, 33, 2, 9], [44, 50, 3], list(range(1, 21)), [40, 41], [7]]


def test_the_toy_reference_is_not_trivial():
    # The tests below are only as sharp as next_id: different prompts give different continuations, and
    # a continuation is not a constant.
    runs = [greedy_after(p, 8) for p in PROMPTS]
    assert len({tuple(r) for r in runs}) == len(PROMPTS)
    assert all(len(set(r)) > 2 for r in runs)


def test_a_toy_model_alone_gives_the_reference_tokens():
    model = ToyModel()
    for prompt in PROMPTS:
        got = [r.token for r in stream_generate(model, _Tok(), prompt, make_sampler(GREEDY), 7)]
        assert got == greedy_after(prompt, 7)


@pytest.mark.parametrize("pipeline", [True, False])
@pytest.mark.parametrize("max_batch", [1, 2, 5])
def test_staggered_batches_give_each_sequence_its_reference_tokens(pipeline, max_batch):
    model = ToyModel()
    scheduler = Scheduler(model, max_batch=max_batch, prefill_chunk=4, pipeline=pipeline)
    seqs = [_seq(model, p, max_tokens=20 + i) for i, p in enumerate(PROMPTS)]
    _run(scheduler, {0: seqs[:2], 2: seqs[2:4], 5: seqs[4:]})
    for i, seq in enumerate(seqs):
        assert seq.tokens == greedy_after(PROMPTS[i], 20 + i)
        assert seq.finish_reason == "length" and seq.error is None
        assert _offsets(seq) == {len(seq.prompt) + len(seq.tokens) - 1}  # the last token is never fed
    assert scheduler.largest_batch == max_batch
    assert scheduler.reserved_bytes == 0 and not scheduler.running and not scheduler.waiting
    assert (scheduler.pipelined_steps > 0) == pipeline
    # Every sampled token but each sequence's first came from one decoded row.
    assert scheduler.decoded_tokens == sum(len(s.tokens) - 1 for s in seqs)


def test_counters_of_a_known_schedule():
    model = ToyModel(lazy=False)
    scheduler = Scheduler(model, max_batch=2, prefill_chunk=8)
    a, b = _seq(model, [1, 2, 3], max_tokens=4), _seq(model, [4, 5], max_tokens=2)
    _run(scheduler, {0: [a, b]})
    # Step 1: both prompts in one call, both first tokens. Step 2: a decode of 2 rows (b ends).
    # Steps 3, 4: a alone.
    assert model.calls == [(1, 5), (2, 1), (1, 1), (1, 1)]
    assert scheduler.steps == 4 and scheduler.decode_steps == 3 and scheduler.decoded_tokens == 4
    assert scheduler.largest_batch == 2 and scheduler.pipelined_steps == 0


def test_eos_ends_a_sequence_with_stop_and_is_reported_not_fed():
    model = ToyModel()
    prompt = PROMPTS[0]
    want = greedy_after(prompt, 10)
    eos = want[3]
    cut = want.index(eos) + 1
    seen = []
    seq = _seq(model, prompt, max_tokens=10, eos_ids=frozenset({eos}))
    seq.on_token = lambda s, token, reason: seen.append((token, reason))
    scheduler = Scheduler(model)
    _run(scheduler, {0: [seq]})
    assert seq.tokens == want[:cut] and seq.finish_reason == "stop"
    assert seen == [(t, None) for t in want[: cut - 1]] + [(eos, "stop")]
    assert _offsets(seq) == {len(prompt) + cut - 1}


def test_length_is_reported_with_the_last_token():
    model = ToyModel()
    seen = []
    seq = _seq(model, PROMPTS[1], max_tokens=3, on_token=lambda s, t, r: seen.append(r))
    _run(Scheduler(model), {0: [seq]})
    assert seen == [None, None, "length"]


def _sampled_reference(prompt, params, n):
    """What a sampler picks from the toy model's logits, step by step, with no scheduler involved."""
    sampler, out = make_sampler(params), []
    for _ in range(n):
        out.append(sampler(mx.array(toy_logits(prompt + out))))
    return out


def test_sampled_and_greedy_rows_in_one_batch():
    model = ToyModel()
    hot = [SamplingParams(temperature=1.5, seed=s) for s in (1, 2)]
    penalised = SamplingParams(presence_penalty=2.0, penalty_window=4)
    specs = [(PROMPTS[0], GREEDY), (PROMPTS[1], hot[0]), (PROMPTS[2], hot[1]), (PROMPTS[3], penalised)]
    seqs = [_seq(model, p, max_tokens=8, params=params) for p, params in specs]
    # A context that holds the greedy answer's first tokens: the penalty must steer away from them.
    context = greedy_after(PROMPTS[3], 4)
    seqs[3].sampler = make_sampler(penalised, context=context)
    scheduler = Scheduler(model, max_batch=4, prefill_chunk=6)
    _run(scheduler, {0: seqs})
    assert seqs[0].tokens == greedy_after(PROMPTS[0], 8)
    for seq, (prompt, params) in zip(seqs[1:3], specs[1:3], strict=True):
        assert seq.tokens == _sampled_reference(prompt, params, 8)
    sampler, want = make_sampler(penalised, context=context), []
    for _ in range(8):
        want.append(sampler(mx.array(toy_logits(PROMPTS[3] + want))))
    assert seqs[3].tokens == want
    assert want != greedy_after(PROMPTS[3], 8)  # the penalty did change something
    assert scheduler.pipelined_steps == 0  # sampled rows: nothing is built ahead


def test_prefill_pieces_callbacks_and_boundaries():
    model = ToyModel()
    progress, boundaries = [], []
    seq = _seq(
        model,
        PROMPTS[2],  # 20 tokens
        max_tokens=2,
        boundaries=[3, 8, 20, 25],
        on_prefill=lambda s, done, total: progress.append((s, done, total)),
        on_boundary=lambda s, n: boundaries.append((n, _offsets(s))),
    )
    scheduler = Scheduler(model, prefill_chunk=6)
    _run(scheduler, {0: [seq]})
    assert progress == [(seq, 3, 20), (seq, 8, 20), (seq, 14, 20), (seq, 20, 20)]
    assert boundaries == [(3, {3}), (8, {8}), (20, {20})]
    assert [shape for shape in model.calls if shape[1] > 1] == [(1, 3), (1, 5), (1, 6), (1, 6)]
    assert seq.tokens == greedy_after(PROMPTS[2], 2)


def test_a_burst_of_prompts_shares_prefill_calls_within_the_chunk():
    model = ToyModel()
    scheduler = Scheduler(model, max_batch=5, prefill_chunk=10)
    seqs = [_seq(model, p, max_tokens=3) for p in PROMPTS]  # 5, 3, 20, 2, 1 tokens
    _run(scheduler, {0: seqs})
    prefill_calls = [n for b, n in model.calls if b == 1 and n > 1]
    # The oldest first; the next ones join while the total stays within 10: 5+3, then 10 of the 20, then
    # 10 + ... the rest waits for the 20-token prompt to be read: 10, then 2 + 1 after it.
    assert prefill_calls[:2] == [8, 10]
    assert all(n <= 10 for n in prefill_calls)
    for seq, p in zip(seqs, PROMPTS, strict=True):
        assert seq.tokens == greedy_after(p, 3)


def test_prefill_group_lets_the_next_join_while_the_total_is_exactly_the_chunk():
    model = ToyModel()
    scheduler = Scheduler(model, max_batch=3, prefill_chunk=8)
    seqs = [_seq(model, p, max_tokens=1) for p in ([1, 2, 3, 4, 5], [6, 7, 8], [9])]
    _run(scheduler, {0: seqs})
    assert model.calls[0] == (1, 8)  # 5 + 3 = 8 fits; the third waits
    assert model.calls[1] == (1, 1)
    assert [s.tokens for s in seqs] == [greedy_after(s.prompt, 1) for s in seqs]


def test_memory_budget_queues_sequences_and_counts_reservations():
    model = ToyModel()
    need = [model.state_bytes(len(p) + 4) for p in PROMPTS]
    budget = need[0] + need[2]  # 10 + 25 MiB: the 20-token prompt has room for one more, not two
    scheduler = Scheduler(model, max_batch=8, prefill_chunk=8, max_state_bytes=budget)
    seqs = [_seq(model, p, max_tokens=4) for p in PROMPTS]
    assert scheduler.state_bytes(seqs[2]) == need[2]
    reserved = []
    for s in seqs:
        s.on_token = lambda seq, t, r: reserved.append(scheduler.reserved_bytes)
    _run(scheduler, {0: seqs})
    assert scheduler.largest_batch == 2
    assert max(reserved) <= budget and {need[0] + need[1], need[2] + need[3]} <= set(reserved)
    assert scheduler.reserved_bytes == 0
    assert [s.tokens for s in seqs] == [greedy_after(p, 4) for p in PROMPTS]
    with pytest.raises(MemoryBudgetError) as refused:
        scheduler.add(_seq(model, list(range(1, 100)), max_tokens=9))  # 1 + 99 + 9 = 109 MiB
    assert str(refused.value) == (
        "this request needs 109 MiB of model state (KV cache and DeltaNet) at its longest, more than the "
        "35 MiB budget: shorten the prompt or max_tokens, or raise the budget"
    )


def test_memory_budget_counts_tokens_already_cached_and_reserve_tokens():
    model = ToyModel()
    scheduler = Scheduler(model, max_state_bytes=10**9)
    first = _seq(model, PROMPTS[2], max_tokens=1)
    _run(scheduler, {0: [first]})
    again = GenSequence([1, 2], make_sampler(GREEDY), 3, first.cache)
    assert scheduler.state_bytes(again) == model.state_bytes(20 + 2 + 3)
    fixed = _seq(model, [1, 2], max_tokens=3, reserve_tokens=100)
    assert scheduler.state_bytes(fixed) == model.state_bytes(100)
    exact = Scheduler(model, max_state_bytes=model.state_bytes(100))
    exact.add(fixed)  # exactly the budget: accepted
    with pytest.raises(MemoryBudgetError):
        Scheduler(model, max_state_bytes=model.state_bytes(100) - 1).add(fixed)


def test_a_sequence_larger_than_what_is_left_waits_even_when_exactly_full():
    model = ToyModel()
    one = model.state_bytes(2 + 3)
    scheduler = Scheduler(model, max_batch=4, max_state_bytes=2 * one)
    seqs = [_seq(model, [i, i + 1], max_tokens=3) for i in (1, 11, 21)]
    for s in seqs:
        scheduler.add(s)
    scheduler.step()
    assert seqs[0] in scheduler.running and seqs[1] in scheduler.running  # 2 * one: exactly the budget
    assert list(scheduler.waiting) == [seqs[2]]
    assert scheduler.reserved_bytes == 2 * one
    _run(scheduler, {})
    assert [s.tokens for s in seqs] == [greedy_after(s.prompt, 3) for s in seqs]


def test_stop_and_cancel_at_every_stage():
    model = ToyModel()
    scheduler = Scheduler(model, max_batch=2, prefill_chunk=4)
    finished = []
    running = _seq(model, PROMPTS[0], max_tokens=50, on_finish=finished.append)
    prefilling = _seq(model, PROMPTS[2], max_tokens=50, on_finish=finished.append)
    waiting = _seq(model, PROMPTS[1], max_tokens=50, on_finish=finished.append)
    never_run = _seq(model, PROMPTS[3], max_tokens=50, on_finish=finished.append)
    scheduler.add(running)
    for _ in range(3):
        scheduler.step()
    scheduler.add(prefilling)
    scheduler.add(waiting)
    scheduler.add(never_run)
    scheduler.step()
    assert prefilling.prefilling and prefilling.fed == 4 and waiting in scheduler.waiting
    running.stop("client left")
    running.stop("ignored: the first reason stays")
    prefilling.cancel()
    waiting.cancel()
    never_run.stop()
    n_running = len(running.tokens)
    scheduler.step()
    assert running.finish_reason == "client left" and len(running.tokens) == n_running
    assert running.tokens == greedy_after(PROMPTS[0], n_running)
    assert prefilling.finish_reason == "cancelled" and prefilling.tokens == []
    assert waiting.finish_reason == "cancelled" and waiting.tokens == [] and waiting not in scheduler.waiting
    assert _offsets(running) == {len(PROMPTS[0]) + n_running - 1}  # the step built ahead was undone
    assert never_run.finish_reason == "stop" and never_run.tokens == []
    assert finished == [running, prefilling, waiting, never_run]
    assert scheduler.reserved_bytes == 0


def test_a_stopped_sequence_at_the_head_of_the_queue_does_not_block_the_next():
    model = ToyModel()
    scheduler = Scheduler(model, max_batch=1)
    first, gone, third = (_seq(model, p, max_tokens=2) for p in PROMPTS[:3])
    for s in (first, gone, third):
        scheduler.add(s)
    scheduler.step()
    scheduler.step()  # first ends here
    gone.stop()
    scheduler._drop_stopped = lambda: None  # only _admit may see it now
    scheduler.step()
    assert gone.finish_reason == "stop" and third in scheduler.running


def test_stop_from_on_token_ends_after_that_token():
    model = ToyModel()
    seq = _seq(model, PROMPTS[0], max_tokens=50)
    seq.on_token = lambda s, token, reason: s.stop("enough") if len(s.tokens) == 4 else None
    other = _seq(model, PROMPTS[1], max_tokens=8)
    scheduler = Scheduler(model, max_batch=2)
    _run(scheduler, {0: [seq, other]})
    assert seq.finish_reason == "enough" and seq.tokens == greedy_after(PROMPTS[0], 4)
    assert _offsets(seq) == {len(PROMPTS[0]) + 3}
    assert other.tokens == greedy_after(PROMPTS[1], 8)
    assert scheduler.pipelined_steps > 0


class _Boom(RuntimeError):
    pass


def test_a_failing_sampler_fails_its_sequence_and_the_rest_go_on(caplog):
    caplog.set_level(logging.DEBUG, logger="streamer.generation.scheduler")
    model = ToyModel()
    seqs = [_seq(model, p, max_tokens=6) for p in PROMPTS[:3]]
    real, calls = seqs[1].sampler, {"n": 0}

    def flaky(logits):
        calls["n"] += 1
        if calls["n"] == 3:
            raise _Boom("sampler broke")
        return real(logits)

    seqs[1].sampler = flaky
    finished = []
    for s in seqs:
        s.on_finish = finished.append
    scheduler = Scheduler(model, max_batch=3, prefill_chunk=64)
    _run(scheduler, {0: seqs})
    assert seqs[1].finish_reason == "error" and isinstance(seqs[1].error, _Boom)
    assert seqs[1].tokens == greedy_after(PROMPTS[1], 2)
    assert seqs[0].tokens == greedy_after(PROMPTS[0], 6) and seqs[2].tokens == greedy_after(PROMPTS[2], 6)
    assert seqs[0].error is None and sorted(map(id, finished)) == sorted(map(id, seqs))
    assert [r.getMessage() for r in caplog.records] == ["step failed for 1 sequence(s): sampler broke"]


def test_a_failing_model_call_fails_every_row_of_it_and_the_next_batch_is_clean():
    model = ToyModel(lazy=False)
    scheduler = Scheduler(model, max_batch=3)
    seqs = [_seq(model, p, max_tokens=6) for p in PROMPTS[:3]]
    _run(scheduler, {0: seqs[:2]})
    real = model._one
    armed = {"on": True}

    def broken(*args):
        if armed["on"]:
            armed["on"] = False
            raise _Boom("model broke")
        return real(*args)

    model._one = broken
    again = [_seq(model, p, max_tokens=3) for p in PROMPTS[:2]]
    _run(scheduler, {0: again})
    assert [s.finish_reason for s in again] == ["error", "error"]
    assert all(isinstance(s.error, _Boom) for s in again)
    assert scheduler.running == [] and scheduler.reserved_bytes == 0


def test_keyboard_interrupt_is_not_the_sequences_fault():
    model = ToyModel()
    seq = _seq(model, PROMPTS[0])

    def interrupted(logits):
        raise KeyboardInterrupt

    seq.sampler = interrupted
    scheduler = Scheduler(model)
    scheduler.add(seq)
    with pytest.raises(KeyboardInterrupt):
        scheduler.step()
    assert not seq.done and seq.error is None


def test_followers_adopt_the_leader_state_and_read_the_prompt_once():
    model = ToyModel()
    prompt = PROMPTS[2]
    params = [SamplingParams(temperature=1.0, seed=s) for s in (3, 4, 5)]
    progress = []
    leader = _seq(model, prompt, max_tokens=6, params=params[0])
    followers = [
        _seq(
            model,
            prompt,
            max_tokens=6,
            params=p,
            follows=leader,
            on_prefill=lambda s, d, t: progress.append((s, d, t)),
        )
        for p in params[1:]
    ]
    scheduler = Scheduler(model, max_batch=3, prefill_chunk=8)
    _run(scheduler, {0: [leader, *followers]})
    for seq, p in zip((leader, *followers), params, strict=True):
        assert seq.tokens == _sampled_reference(prompt, p, 6)
    assert [f.adopted for f in followers] == [True, True] and not leader.adopted
    assert [f.follows for f in followers] == [None, None]
    assert progress == [(followers[0], 20, 20), (followers[1], 20, 20)]
    assert sum(n for b, n in model.calls if b == 1 and n > 1) == len(prompt)
    assert all(_offsets(f) == {len(prompt) + 5} for f in followers)


def test_a_follower_of_another_prompt_reads_its_own():
    model = ToyModel()
    leader = _seq(model, PROMPTS[2], max_tokens=3)
    other = _seq(model, PROMPTS[0], max_tokens=3, follows=leader)  # not the same request after all
    scheduler = Scheduler(model, max_batch=2, prefill_chunk=64)
    _run(scheduler, {0: [leader, other]})
    assert leader.tokens == greedy_after(PROMPTS[2], 3)
    assert not other.adopted and other.tokens == greedy_after(PROMPTS[0], 3)


def test_a_follower_with_another_starting_state_reads_its_own():
    model = ToyModel()
    leader = _seq(model, [3, 4, 5], max_tokens=3)
    ahead = model.make_cache()
    warm = GenSequence([9, 9], make_sampler(GREEDY), 1, ahead)
    _run(Scheduler(model), {0: [warm]})  # 2 tokens already in this cache
    follower = GenSequence([3, 4, 5], make_sampler(GREEDY), 3, ahead, follows=leader)
    scheduler = Scheduler(model, max_batch=2, prefill_chunk=64)
    _run(scheduler, {0: [leader, follower]})
    assert leader.tokens == greedy_after([3, 4, 5], 3)
    assert not follower.adopted and follower.tokens == greedy_after([9, 9, 3, 4, 5], 3)


def test_followers_of_a_leader_that_left_read_their_own_prompt():
    model = ToyModel()
    leader = _seq(model, PROMPTS[2], max_tokens=3)
    follower = _seq(model, PROMPTS[2], max_tokens=3, follows=leader)
    scheduler = Scheduler(model, max_batch=2, prefill_chunk=4)
    scheduler.add(leader)
    scheduler.add(follower)
    scheduler.step()
    leader.cancel()
    _run(scheduler, {})
    assert follower.follows is None and not follower.adopted
    assert follower.tokens == greedy_after(PROMPTS[2], 3)


@pytest.mark.parametrize("leader_state", ["finished", "past its prompt"])
def test_a_follower_added_after_its_leader_read_the_prompt_reads_its_own(leader_state):
    model = ToyModel()
    leader = _seq(model, PROMPTS[2], max_tokens=3 if leader_state == "finished" else 50)
    scheduler = Scheduler(model, max_batch=2, prefill_chunk=64)
    scheduler.add(leader)
    scheduler.step()  # the whole prompt is read in one piece
    if leader_state == "finished":
        _run(scheduler, {})
    follower = _seq(model, PROMPTS[2], max_tokens=3, follows=leader)
    scheduler.add(follower)
    for _ in range(20):  # a bound: a follower waiting for an adoption that never comes would never end
        if follower.done:
            break
        scheduler.step()
    assert follower.done and not follower.adopted
    assert follower.tokens == greedy_after(PROMPTS[2], 3)


def test_argument_checks():
    model = ToyModel()
    with pytest.raises(ValueError, match=r"^a sequence needs at least one prompt token$"):
        GenSequence([], make_sampler(GREEDY), 3, model.make_cache())
    with pytest.raises(ValueError, match=r"^max_tokens must be >= 1, got 0$"):
        GenSequence([1], make_sampler(GREEDY), 0, model.make_cache())
    GenSequence([1], make_sampler(GREEDY), 1, model.make_cache())
    with pytest.raises(ValueError, match=r"^max_batch must be >= 1, got 0$"):
        Scheduler(model, max_batch=0)
    with pytest.raises(ValueError, match=r"^prefill_chunk must be >= 1, got 0$"):
        Scheduler(model, prefill_chunk=0)
    s = Scheduler(model, max_batch=1, prefill_chunk=1)
    assert s.max_batch == 1 and s.prefill_chunk == 1 and s.model is model and s.max_state_bytes is None
    assert Scheduler(model).max_batch == 8 and Scheduler(model).prefill_chunk == 512


class _Clock:
    def __init__(self):
        self.now = 100.0

    def perf_counter(self):
        return self.now


def test_timings_of_a_sequence(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(scheduler_module, "time", clock)
    model = ToyModel()
    seq = _seq(model, PROMPTS[0], max_tokens=3)
    assert seq.prompt_seconds == 0.0 and seq.generation_tps() == 0.0
    scheduler = Scheduler(model)
    scheduler.add(seq)
    seq.on_prefill = lambda s, d, t: setattr(clock, "now", 102.5)
    scheduler.step()
    assert seq.admitted_at == 100.0 and seq.first_token_at == 102.5 and seq.prompt_seconds == 2.5
    assert seq.generation_tps(now=104.5) == 0.5  # 1 token in 2 s
    clock.now = 103.5
    assert seq.generation_tps() == 1.0
    # No time yet: the floor, not a division by zero.
    assert seq.generation_tps(now=102.5) == pytest.approx(1e9)
    half = _seq(model, PROMPTS[0])
    half.admitted_at = 1.0
    assert half.prompt_seconds == 0.0


def test_sequence_defaults():
    model = ToyModel()
    seq = GenSequence([1, 2], make_sampler(GREEDY), 3, model.make_cache())
    assert seq.eos_ids == frozenset() and seq.boundaries == () and seq.label == ""
    assert seq.fed == 0 and seq.tokens == [] and seq.finish_reason is None and not seq.done
    assert seq.prefilling and not seq.adopted and seq.follows is None and seq.reserve_tokens is None
    seq.cancel()
    assert seq._stop_reason == "cancelled" and not seq.done
    other = GenSequence([1, 2], make_sampler(GREEDY), 3, model.make_cache())
    assert other.tokens is not seq.tokens
    other.stop()
    assert other._stop_reason == "stop"


def test_settle_undoes_the_step_built_ahead():
    model = ToyModel()
    seq = _seq(model, PROMPTS[1], max_tokens=20)
    scheduler = Scheduler(model)
    scheduler.add(seq)
    for _ in range(4):
        scheduler.step()
    assert scheduler.pipelined_steps > 0 and scheduler._pending is not None
    assert _offsets(seq) == {len(PROMPTS[1]) + len(seq.tokens)}  # one more than fed: built ahead
    scheduler.settle()
    assert scheduler._pending is None
    assert _offsets(seq) == {len(PROMPTS[1]) + len(seq.tokens) - 1}
    scheduler.settle()  # nothing left to undo
    _run(scheduler, {})
    assert seq.tokens == greedy_after(PROMPTS[1], 20)


def test_a_step_built_ahead_is_redone_when_the_batch_changes():
    model = ToyModel()
    scheduler = Scheduler(model, max_batch=2)
    a = _seq(model, PROMPTS[0], max_tokens=12)
    b = _seq(model, PROMPTS[1], max_tokens=12)
    scheduler.add(a)
    for _ in range(3):
        scheduler.step()
    assert scheduler.pipelined_steps > 0
    scheduler.add(b)  # joins: the step built for [a] alone is undone, [a, b] runs anew
    _run(scheduler, {})
    assert a.tokens == greedy_after(PROMPTS[0], 12) and b.tokens == greedy_after(PROMPTS[1], 12)
    assert _offsets(a) == {len(PROMPTS[0]) + 11} and _offsets(b) == {len(PROMPTS[1]) + 11}


def test_no_step_is_built_ahead_for_the_last_token_or_an_eager_model():
    model = ToyModel()
    scheduler = Scheduler(model)
    seq = _seq(model, PROMPTS[0], max_tokens=2)  # first token from the prefill, the second ends it
    _run(scheduler, {0: [seq]})
    assert scheduler.pipelined_steps == 0 and _offsets(seq) == {len(PROMPTS[0]) + 1}
    seq3 = _seq(model, PROMPTS[0], max_tokens=3)
    _run(scheduler, {0: [seq3]})
    assert scheduler.pipelined_steps == 1
    eager = ToyModel(lazy=False)
    s = Scheduler(eager)
    _run(s, {0: [_seq(eager, PROMPTS[0], max_tokens=10)]})
    assert s.pipelined_steps == 0
    plain = _Plain()
    s = Scheduler(plain)
    seq = _seq(plain, PROMPTS[0], max_tokens=10)
    _run(s, {0: [seq]})
    assert s.pipelined_steps == 0 and seq.tokens == greedy_after(PROMPTS[0], 10)


class _Plain(ToyModel):
    """A model that does not say whether its decode is lazy."""

    decode_is_lazy = None

    def __getattribute__(self, name):
        if name == "decode_is_lazy":
            raise AttributeError(name)
        return super().__getattribute__(name)


def test_nothing_is_built_ahead_while_a_sequence_waits_or_a_row_stops():
    model = ToyModel()
    scheduler = Scheduler(model, max_batch=1)
    a, b = _seq(model, PROMPTS[0], max_tokens=6), _seq(model, PROMPTS[1], max_tokens=6)
    built_while_a_ran = []
    a.on_finish = lambda seq: built_while_a_ran.append(scheduler.pipelined_steps)
    _run(scheduler, {0: [a, b]})
    assert built_while_a_ran == [0]  # b waited the whole time a ran
    assert scheduler.pipelined_steps > 0  # then b ran alone
    assert a.tokens == greedy_after(PROMPTS[0], 6) and b.tokens == greedy_after(PROMPTS[1], 6)


# ---------------------------------------------------------------------------------------------------------
# generate.py: prefill, token_text, stream_generate


class _Detok:
    """Text 't<id>' per token; finalize returns what is 'held back' ('|end')."""

    def __init__(self):
        self.finalized = 0

    def add(self, token):
        return f"t{token} "

    def finalize(self):
        self.finalized += 1
        return "|end"


class _Tok:
    def __init__(self, eos=()):
        self.eos_token_ids = list(eos)

    def detokenizer(self):
        return _Detok()


def test_token_text():
    d = _Detok()
    assert token_text(d, 5, None) == "t5 " and d.finalized == 0
    assert token_text(d, 5, "length") == "t5 |end" and d.finalized == 1
    assert token_text(d, 5, "stop") == "|end" and d.finalized == 2


def test_prefill_runs_chunks_and_returns_the_last_logits():
    model = ToyModel()
    cache = model.make_cache()
    progress = []
    logits = prefill(model, PROMPTS[2], cache, chunk=6, progress=lambda d, t: progress.append((d, t)))
    assert logits.shape == (V,)
    assert int(mx.argmax(logits).item()) == next_id(PROMPTS[2])
    np.testing.assert_array_equal(np.array(logits), toy_logits(PROMPTS[2]))
    assert model.calls == [(1, 6), (1, 6), (1, 6), (1, 2)]
    assert model.last_only == [True] * 4  # the output head on the last position only
    assert progress == [(6, 20), (12, 20), (18, 20), (20, 20)]
    assert {c.offset for c in cache} == {20}
    model.calls.clear()
    prefill(model, [1, 2, 3], model.make_cache())
    assert model.calls == [(1, 3)]  # the default chunk is 512
    with pytest.raises(ValueError, match=r"^prefill needs at least one token$"):
        prefill(model, [], model.make_cache())


def test_stream_generate_responses():
    model = ToyModel()
    want = greedy_after(PROMPTS[0], 4)
    stats = iter(range(100))
    out = list(
        stream_generate(model, _Tok(), PROMPTS[0], make_sampler(GREEDY), 4, stats=lambda: {"n": next(stats)})
    )
    assert all(isinstance(r, GenerationResponse) for r in out)
    assert [r.token for r in out] == want
    assert [r.text for r in out] == [f"t{t} " for t in want[:3]] + [f"t{want[3]} |end"]
    assert [r.finish_reason for r in out] == [None, None, None, "length"]
    assert [r.generation_tokens for r in out] == [1, 2, 3, 4]
    assert all(r.prompt_tokens == len(PROMPTS[0]) for r in out)
    assert [r.stats for r in out] == [{"n": i} for i in range(4)]
    assert all(r.prompt_tps > 0 and r.generation_tps > 0 for r in out)
    plain = list(stream_generate(model, _Tok(), PROMPTS[0], make_sampler(GREEDY), 1))
    assert plain[0].stats == {} and plain[0].finish_reason == "length"


def test_stream_generate_rates(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(scheduler_module, "time", clock)
    model = ToyModel()
    progress = []

    def on_prefill(done, total):
        progress.append((done, total))
        clock.now += 2.0

    stream = stream_generate(
        model, _Tok(), PROMPTS[2], make_sampler(GREEDY), 3, prefill_progress=on_prefill, prefill_chunk=8
    )
    first = next(stream)
    assert progress == [(8, 20), (16, 20), (20, 20)]
    assert first.prompt_tps == 20 / 6.0  # 20 tokens, admitted at 100, first token at 106
    clock.now += 4.0
    second = next(stream)
    assert second.generation_tps == 2 / 4.0
    list(stream)
    instant = next(stream_generate(model, _Tok(), [1], make_sampler(GREEDY), 1))
    assert instant.prompt_tps == 1 / 1e-9  # no time passed at all: the floor


def test_stream_generate_stops_at_eos_and_continues_a_cache():
    model = ToyModel()
    want = greedy_after(PROMPTS[1], 12)
    eos = want[4]
    cut = want.index(eos) + 1
    out = list(stream_generate(model, _Tok(eos=[eos]), PROMPTS[1], make_sampler(GREEDY), 12))
    assert [r.token for r in out] == want[:cut]
    assert out[-1].finish_reason == "stop" and out[-1].text == "|end"
    cache = model.make_cache()
    first = [
        r.token for r in stream_generate(model, _Tok(), PROMPTS[1], make_sampler(GREEDY), 3, cache=cache)
    ]
    # The cache holds the prompt and the tokens fed: all but the last sampled one.
    follow_up = [first[-1], 9, 8]
    more = [r.token for r in stream_generate(model, _Tok(), follow_up, make_sampler(GREEDY), 3, cache=cache)]
    assert more == greedy_after(PROMPTS[1] + first + [9, 8], 3)


def test_a_consumer_that_stops_early_leaves_the_cache_at_its_tokens():
    model = ToyModel()
    cache = model.make_cache()
    stream = stream_generate(model, _Tok(), PROMPTS[0], make_sampler(GREEDY), 50, cache=cache)
    got = [next(stream).token for _ in range(5)]
    stream.close()
    assert got == greedy_after(PROMPTS[0], 5)
    assert {c.offset for c in cache} == {len(PROMPTS[0]) + 4}


def test_stream_generate_raises_the_sequence_error():
    model = ToyModel()

    def broken(logits):
        raise _Boom("sampler broke")

    with pytest.raises(_Boom, match="sampler broke"):
        list(stream_generate(model, _Tok(), PROMPTS[0], broken, 5))


class _Scratch:
    """A layer cache with no position (no ``offset``): counts as 0 cached tokens."""

    state: list = []  # nothing to evaluate

    def snapshot(self):
        return None

    def restore(self, snap):
        pass


class _ScratchModel(ToyModel):
    def make_cache(self):
        return [KVCache(), DeltaNetCache(), _Scratch()]


class _Bigram(ToyModel):
    """A model without layers (no state at all): the next token depends on the last one alone."""

    def make_cache(self):
        return []

    def __call__(self, tokens, cache, last_only=False):
        self.calls.append(tuple(tokens.shape))
        logits = -0.3 * mx.abs(mx.arange(V)[None, None, :] - ((tokens * 7 + 3) % V)[..., None])
        if cache and isinstance(cache[0], RaggedBatch):  # never: no layers, so no per-layer batches
            raise AssertionError
        if last_only:
            if hasattr(cache, "lengths") and cache.lengths:  # a ragged call: each piece's last position
                return logits[:, mx.array(np.cumsum(cache.lengths) - 1)]
            return logits[:, -1:]
        return logits


def test_layers_without_a_position_and_models_without_layers_count_no_cached_tokens():
    scratch = _ScratchModel()
    scheduler = Scheduler(scratch, max_state_bytes=10**12)
    fresh = _seq(scratch, PROMPTS[0], max_tokens=3)
    assert scheduler.state_bytes(fresh) == scratch.state_bytes(len(PROMPTS[0]) + 3)
    _run(scheduler, {0: [fresh]})
    assert fresh.tokens == greedy_after(PROMPTS[0], 3)
    again = GenSequence([1, 2], make_sampler(GREEDY), 3, fresh.cache)
    assert scheduler.state_bytes(again) == scratch.state_bytes(len(PROMPTS[0]) + 2 + 2 + 3)

    bigram = _Bigram()
    scheduler = Scheduler(bigram, max_batch=2, max_state_bytes=10**12)
    seqs = [_seq(bigram, p, max_tokens=4) for p in PROMPTS[:2]]
    assert scheduler.state_bytes(seqs[0]) == bigram.state_bytes(len(PROMPTS[0]) + 4)
    _run(scheduler, {0: seqs})
    for seq, p in zip(seqs, PROMPTS, strict=False):
        want = [p[-1]]
        for _ in range(4):
            want.append((want[-1] * 7 + 3) % V)
        assert seq.tokens == want[1:]


def test_one_step_is_built_ahead_per_decode_step_but_the_last_and_each_is_used():
    """A lone greedy sequence of N tokens: the first comes from the prefill, N - 1 decode steps follow, and
    each but the last builds the next one ahead, which the next step then uses: N model calls in all."""
    model = ToyModel()
    scheduler = Scheduler(model)
    seq = _seq(model, PROMPTS[0], max_tokens=10)
    _run(scheduler, {0: [seq]})
    assert seq.tokens == greedy_after(PROMPTS[0], 10)
    assert scheduler.decode_steps == 9 and scheduler.pipelined_steps == 8
    assert len(model.calls) == 1 + 9  # no step was built twice or thrown away
    assert model.kinds == ["KVCache"] * 10  # a batch of one runs on the sequence's own caches


def test_a_sequence_stopped_during_a_step_is_left_out_of_the_step_built_ahead():
    """A stop that lands mid-step (here from another sequence's prefill callback, as a client thread could)
    after the next step was built for the batch: that step is undone and the batch runs anew without it."""
    model = ToyModel()
    scheduler = Scheduler(model, max_batch=3)
    a, b = _seq(model, PROMPTS[0], max_tokens=12), _seq(model, PROMPTS[1], max_tokens=12)
    scheduler.add(a)
    scheduler.add(b)
    for _ in range(3):
        scheduler.step()
    assert scheduler._pending is not None  # built ahead for [a, b]
    late = _seq(model, PROMPTS[3], max_tokens=4, on_prefill=lambda s, done, total: b.stop("left"))
    scheduler.add(late)
    _run(scheduler, {})
    assert b.finish_reason == "left" and 0 < len(b.tokens) < 12
    assert b.tokens == greedy_after(PROMPTS[1], len(b.tokens))
    assert _offsets(b) == {len(PROMPTS[1]) + len(b.tokens) - 1}  # what was built for it was undone
    assert a.tokens == greedy_after(PROMPTS[0], 12) and late.tokens == greedy_after(PROMPTS[3], 4)
    assert _offsets(a) == {len(PROMPTS[0]) + 11}


class _CountingSampler(TokenSampler):
    """A plain greedy sampler that counts the times it is asked to pick."""

    def __init__(self):
        super().__init__(GREEDY)
        self.picks = 0

    def __call__(self, logits):
        self.picks += 1
        return super().__call__(logits)


def test_greedy_rows_take_the_batch_argmax_instead_of_calling_their_samplers():
    """One argmax over the batch per decode step: a plain greedy row's sampler picks only the first token
    (from the prompt's logits) and is told the others (``accept``)."""
    model = ToyModel(lazy=False)
    seqs = [_seq(model, p, max_tokens=6) for p in PROMPTS[:3]]
    for s in seqs:
        s.sampler = _CountingSampler()
    _run(Scheduler(model, max_batch=3), {0: seqs})
    assert [s.tokens for s in seqs] == [greedy_after(p, 6) for p in PROMPTS[:3]]
    assert [s.sampler.picks for s in seqs] == [1, 1, 1]
    assert [list(s.sampler._recent) for s in seqs] == [s.tokens for s in seqs]


def test_a_failing_on_token_fails_only_its_sequence():
    model = ToyModel()
    seqs = [_seq(model, p, max_tokens=6) for p in PROMPTS[:3]]

    def fussy(seq, token, reason):
        if len(seq.tokens) == 3:
            raise _Boom("consumer broke")

    seqs[1].on_token = fussy
    scheduler = Scheduler(model, max_batch=3)
    _run(scheduler, {0: seqs})
    assert seqs[1].finish_reason == "error" and isinstance(seqs[1].error, _Boom)
    assert seqs[1].tokens == greedy_after(PROMPTS[1], 3)
    assert _offsets(seqs[1]) == {len(PROMPTS[1]) + 2}
    assert seqs[0].tokens == greedy_after(PROMPTS[0], 6) and seqs[2].tokens == greedy_after(PROMPTS[2], 6)


def test_a_failing_decode_call_fails_its_rows_and_a_later_batch_is_clean():
    model = ToyModel(lazy=False)
    scheduler = Scheduler(model, max_batch=2)
    seqs = [_seq(model, p, max_tokens=6) for p in PROMPTS[:2]]
    for s in seqs:
        scheduler.add(s)
    scheduler.step()  # both prompts read, both first tokens
    real = model._one

    def broken(*args):
        raise _Boom("decode broke")

    model._one = broken
    scheduler.step()  # the decode of both rows fails
    assert [s.finish_reason for s in seqs] == ["error", "error"]
    assert all(isinstance(s.error, _Boom) and len(s.tokens) == 1 for s in seqs)
    model._one = real
    later = _seq(model, PROMPTS[2], max_tokens=4)
    _run(scheduler, {0: [later]})
    assert later.tokens == greedy_after(PROMPTS[2], 4)
    assert scheduler.running == [] and scheduler.reserved_bytes == 0


def test_a_prompt_piece_counts_its_own_tokens_toward_the_chunk():
    """The second piece of a long prompt (2 tokens after the first 8) leaves room for another prompt."""
    model = ToyModel()
    scheduler = Scheduler(model, max_batch=2, prefill_chunk=8)
    long, short = _seq(model, list(range(1, 11)), max_tokens=2), _seq(model, [3, 4], max_tokens=2)
    _run(scheduler, {0: [long, short]})
    prefill = [n for b, n in model.calls if b == 1 and n > 1]
    assert prefill == [8, 4]  # 8 of the long one; then its last 2 with the short one's 2
    assert long.tokens == greedy_after(long.prompt, 2) and short.tokens == greedy_after(short.prompt, 2)


def test_followers_are_never_prefilled_even_with_room_in_the_chunk():
    model = ToyModel()
    prompt = PROMPTS[2]
    leader = _seq(model, prompt, max_tokens=3)
    followers = [_seq(model, prompt, max_tokens=3, follows=leader) for _ in range(2)]
    scheduler = Scheduler(model, max_batch=3, prefill_chunk=64)
    _run(scheduler, {0: [leader, *followers]})
    assert model.calls[0] == (1, len(prompt))  # the leader's prompt alone
    assert [s.tokens for s in followers] == [greedy_after(prompt, 3)] * 2


def test_a_sequence_stopped_right_after_admission_is_not_prefilled():
    """A stop that lands after the admission (another thread) keeps its prompt from being read."""
    model = ToyModel()
    scheduler = Scheduler(model, max_batch=2, prefill_chunk=64)
    kept, gone = _seq(model, PROMPTS[0], max_tokens=2), _seq(model, PROMPTS[2], max_tokens=2)
    admit = scheduler._admit

    def admit_then_stop():
        admit()
        gone.stop("left")

    scheduler._admit = admit_then_stop
    _run(scheduler, {0: [kept, gone]})
    assert model.calls[0] == (1, len(PROMPTS[0]))  # the stopped one's prompt is not in the call
    assert gone.finish_reason == "left" and gone.fed == 0 and gone.tokens == []
    assert kept.tokens == greedy_after(PROMPTS[0], 2)


def test_only_followers_adopt_a_prompt_state():
    """Another request with the same prompt that does not follow the leader reads the prompt itself."""
    model = ToyModel()
    scheduler = Scheduler(model, max_batch=1, prefill_chunk=64)
    leader = _seq(model, PROMPTS[2], max_tokens=3)
    twin = _seq(model, PROMPTS[2], max_tokens=3)  # waits while the leader runs
    _run(scheduler, {0: [leader, twin]})
    assert not twin.adopted and twin.tokens == greedy_after(PROMPTS[2], 3)
    assert [n for b, n in model.calls if n > 1] == [len(PROMPTS[2])] * 2


def test_counters_start_at_zero_and_a_prefill_alone_decodes_nothing():
    model = ToyModel()
    scheduler = Scheduler(model)
    assert (scheduler.steps, scheduler.decode_steps, scheduler.decoded_tokens) == (0, 0, 0)
    assert scheduler.largest_batch == 0 and scheduler.pipelined_steps == 0 and not scheduler.busy
    _run(scheduler, {0: [_seq(model, PROMPTS[0], max_tokens=1)]})  # its one token comes from the prefill
    assert scheduler.steps == 1 and scheduler.decode_steps == 0 and scheduler.largest_batch == 0
