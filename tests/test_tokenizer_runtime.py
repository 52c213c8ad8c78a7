"""The runtime Tokenizer: streaming detokenization never shows part of a character, special tokens, eos."""

from __future__ import annotations

import random

import pytest

from streamer.text.tokenizer import Tokenizer
from streamer.text.tokenizer_assets import write_tokenizer_files

# Emoji (with skin tone, ZWJ family, flag), CJK, Hangul, Devanagari, accents: many split across tokens.
TEXT = "Hi 🙂👍🏽 — 你好，世界！混合专家模型。👨‍👩‍👧‍👦 🇯🇵 東京 안녕하세요 नमस्ते café ½ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🦙🦙🦙 end"


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen-tok")
    write_tokenizer_files(path, "qwen3_5")
    return Tokenizer(path)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("small-tok")
    write_tokenizer_files(path, "small")
    return Tokenizer(path)


def _stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = False) -> list[str]:
    detok = tok.detokenizer(skip_special_tokens)
    return [detok.add(i) for i in ids] + [detok.finalize()]


def test_emoji_and_cjk_split_across_tokens_stream_whole_characters(qwen):
    ids = qwen.encode(TEXT)
    split = [i for i in ids if "\ufffd" in qwen.decode([i])]
    assert len(split) >= 10, "the text must exercise characters split across tokens"
    pieces = _stream(qwen, ids)
    assert "".join(pieces) == TEXT
    assert not any("\ufffd" in p for p in pieces)
    # Every prefix of the output is a prefix of the text: nothing shown is ever taken back.
    shown = ""
    for p in pieces:
        shown += p
        assert TEXT.startswith(shown)
    assert sum(p == "" for p in pieces) >= len(split) // 2  # held back while a character was incomplete


def test_each_piece_appears_as_soon_as_its_character_is_complete(qwen):
    ids = qwen.encode("🦙")
    assert len(ids) > 1
    pieces = _stream(qwen, ids)
    assert pieces[:-2] == [""] * (len(ids) - 1) and pieces[-2] == "🦙" and pieces[-1] == ""


@pytest.mark.parametrize("which", ["qwen", "small"])
@pytest.mark.parametrize("skip", [False, True])
def test_random_ids_stream_to_exactly_what_decode_gives(which, skip, request):
    tok = request.getfixturevalue(which)
    rng = random.Random(7)
    for _ in range(20):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 60))]
        assert "".join(_stream(tok, ids, skip)) == tok.decode(ids, skip_special_tokens=skip)


def test_invalid_bytes_come_out_as_replacement_characters_not_held_forever(qwen):
    lone_continuation = next(i for i in range(qwen.vocab_size) if qwen.token_bytes(i) == b"\x80")
    lead = next(i for i in range(qwen.vocab_size) if qwen.token_bytes(i) == b"\xe4")  # needs 2 more bytes
    a = qwen.encode("a")[0]
    assert _stream(qwen, [a, lone_continuation, a]) == ["a", "\ufffd", "a", ""]
    # An unfinished character is held, then flushed as U+FFFD when the stream ends.
    assert _stream(qwen, [a, lead]) == ["a", "", "\ufffd"]
    # ... or when the next byte cannot continue it.
    assert _stream(qwen, [lead, a]) == ["", "\ufffda", ""]


def test_special_tokens_are_kept_or_skipped(qwen):
    text = "<|im_start|>assistant\n<think>\nhm\n</think>\n\nHello 👋<|im_end|>"
    ids = qwen.encode(text)
    assert "".join(_stream(qwen, ids)) == text
    # <think> is an added but not special token (as Qwen ships it): skipping specials keeps it.
    assert (
        "".join(_stream(qwen, ids, skip_special_tokens=True))
        == "assistant\n<think>\nhm\n</think>\n\nHello 👋"
    )
    assert qwen.is_special(qwen.token_id("<|im_end|>")) and not qwen.is_special(qwen.token_id("</think>"))


def test_long_streams_neither_repeat_nor_drop_text(qwen):
    text = "".join(f"line {i}: 数据 🙂\n" for i in range(200))
    assert "".join(_stream(qwen, qwen.encode(text))) == text


def test_eos_and_generation_config_come_from_the_checkpoint_files(qwen):
    assert qwen.eos_token_ids == {qwen.token_id("<|im_end|>")}  # tokenizer_config's eos_token
    assert qwen.generation_config == {}


def test_ids_past_the_vocabulary_decode_to_nothing_as_decode_does(qwen):
    # The model's embedding is padded past the tokenizer (248320 vs 248077 rows): a sampled padding id
    # must not break the stream.
    ids = [qwen.encode("a")[0], qwen.vocab_size + 5, qwen.encode("b")[0]]
    assert _stream(qwen, ids) == ["a", "", "b", ""]
    assert qwen.decode(ids) == "ab"
