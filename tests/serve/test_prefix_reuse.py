"""`streamer serve` reuses a conversation's state: follow-ups prefill only their new part, the worker
resumes from the end of an answer, the prefix cache stays within its budget."""

from __future__ import annotations

from streamer.generation.generate import stream_generate
from streamer.generation.prefix_cache import PrefixCache
from streamer.generation.sampling import SamplingParams, make_sampler
from streamer.loader import load_engine
from streamer.serve.worker import Finished, GenerationWorker, Job, Piece, StopMatcher
from tests.serve.helpers import GREEDY, oai, stats

# ---------------------------------------------------------------------------------------------------------
# Prefix reuse


def test_follow_up_prefills_only_the_new_part(server, packed):
    client = oai(server)
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about foxes."}]
    options = {"max_tokens": 6, "extra_body": {"ignore_eos": True}, **GREEDY}
    a = client.chat.completions.create(model="tiny", messages=first, **options)
    tok = server.worker.engine.tokenizer
    history = len(tok.encode(tok.apply_chat_template(first, add_generation_prompt=False)))
    follow = [
        *first,
        {"role": "assistant", "content": "Foxes are quick."},
        {"role": "user", "content": "More?"},
    ]
    b = client.chat.completions.create(model="tiny", messages=follow, **options)
    assert a.usage.prompt_tokens_details.cached_tokens == 0
    assert b.usage.prompt_tokens_details.cached_tokens == history
    record = stats(server)["recent"][-1]
    assert record["label"] == b.id and record["prefilled_tokens"] == b.usage.prompt_tokens - history
    # The restored state answers exactly as a fresh prefill does.
    ids = tok.encode(tok.apply_chat_template(follow))
    with load_engine(packed) as engine:
        tokens = stream_generate(engine.model, engine.tokenizer, ids, make_sampler(SamplingParams()), 6)
        want = engine.tokenizer.decode([r.token for r in tokens])
    assert b.choices[0].message.model_extra["reasoning_content"] == want.strip()


def test_worker_resumes_from_the_end_of_an_answer(packed):
    """An answer's end state is kept: a prompt that extends prompt + answer prefills only the rest."""

    def run(worker, ids, n):
        job = worker.submit(Job(ids, n, SamplingParams(), ignore_eos=True))
        while not isinstance(event := job.events.get(timeout=30), Finished):
            assert isinstance(event, Piece)
        return event

    cached = GenerationWorker(lambda: load_engine(packed), PrefixCache(10**9))
    fresh = GenerationWorker(lambda: load_engine(packed), PrefixCache(0))
    cached.start(), fresh.start()
    try:
        prompt = [11, 12, 13, 14, 15]
        first = run(cached, prompt, 7)
        extended = [*prompt, *first.token_ids, 21, 22]
        second, reference = run(cached, extended, 5), run(fresh, extended, 5)
        assert second.usage.cached_tokens == len(prompt) + 7 - 1  # the last sampled token was never fed
        assert reference.usage.cached_tokens == 0
        assert second.token_ids == reference.token_ids
        # A third turn restores KV from two segments (the first answer's and the second's).
        longer = [*extended, *second.token_ids, 31]
        third, reference = run(cached, longer, 4), run(fresh, longer, 4)
        assert third.usage.cached_tokens == len(extended) + 5 - 1
        assert third.token_ids == reference.token_ids
        (latest,) = [s for s in cached.prefix_cache._entries.values() if len(s.ids) == len(longer) + 3]
        assert [(seg.start, seg.end) for seg in latest.state.segments] == [
            (0, len(prompt) + 6),
            (len(prompt) + 6, len(extended) + 4),
            (len(extended) + 4, len(longer) + 3),
        ]
    finally:
        cached.close(), fresh.close()


def test_prefix_cache_lru_within_budget():
    cache = PrefixCache(max_bytes=100, max_entries=3)
    assert cache.store([1, 2], ["a"], 40) and cache.store([1, 2, 3, 4], ["b"], 40)
    assert cache.lookup([1, 2, 3, 4, 5]).state == ["b"]  # the longest strict prefix
    assert cache.lookup([1, 2, 3, 4]).state == ["a"]  # never the whole prompt: one token must run
    assert cache.lookup([1, 9]) is None and cache.lookup([1]) is None
    cache.store([7, 7], ["c"], 40)  # over 100 bytes: the least recently used ([1, 2, 3, 4]) goes
    assert [1, 2, 3, 4] not in cache and [1, 2] in cache and cache.bytes == 80
    assert not cache.store([8], ["huge"], 101)
    for i in range(5):
        cache.store([9, i], [i], 1)
    assert len(cache) == 3 and cache.stats()["evictions"] == 1 + 4


def test_prefix_cache_counts_shared_parts_once():
    class Part:
        def __init__(self, nbytes):
            self.nbytes = nbytes

    a, b, c = Part(30), Part(20), Part(20)
    cache = PrefixCache(max_bytes=100)
    cache.store([1], "s1", 5, (a,))
    cache.store([1, 2], "s2", 5, (a, b))  # a conversation's later turn shares the first segment
    assert cache.bytes == 5 + 5 + 30 + 20
    assert not cache.store([9], "big", 90, (c,))  # 110 with its shared part: over budget alone
    cache.store([1, 2, 3], "s3", 5, (a, b, c))
    assert cache.bytes == 15 + 70
    cache.store([4], "s4", 20)  # over 100: the oldest goes, but its segment lives on in s2 and s3
    assert [1] not in cache and cache.bytes == 10 + 70 + 20
    cache.store([5], "s5", 5)  # s2 goes, yet frees only its own 5: b is still held by s3
    assert [1, 2] not in cache and cache.bytes == 5 + 70 + 20 + 5
    cache.store([6], "s6", 5)  # s3 goes with the last references to a, b and c
    assert list(cache._entries) == [(4,), (5,), (6,)] and cache.bytes == 30


def test_prefix_cache_evicts_answer_ends_first():
    cache = PrefixCache(max_bytes=30)
    cache.store([1], "boundary", 10, priority=1)
    cache.store([1, 2], "answer", 10, priority=0)
    cache.store([3], "boundary 2", 10, priority=1)
    cache.store([4], "boundary 3", 10, priority=1)  # the answer goes, though the first boundary is older
    assert [1] in cache and [1, 2] not in cache
    cache.store([5, 6], "answer 2", 10, priority=0)
    assert cache.lookup([5, 6, 7]).state == "answer 2"  # a hit shows it is reusable: priority 1 now
    cache.store([8], "boundary 4", 10, priority=1)
    assert [5, 6] in cache and [1] not in cache


def test_stop_matcher_across_pieces():
    m = StopMatcher(["STOP", "\n\n"])
    assert m.feed("abc S") == ("abc ", None)
    assert m.feed("TO") == ("", None)
    assert m.feed("P and more") == ("", "STOP")
    m = StopMatcher(["xyz"])
    assert m.feed("ax") == ("a", None) and m.feed("b") == ("xb", None) and m.flush() == ""
