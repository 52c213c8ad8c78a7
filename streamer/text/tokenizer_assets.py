"""Tokenizer files that synthetic checkpoints ship with.

Two vocabularies:
- ``small``: a byte-level BPE trained on a fixed built-in text, with the Qwen3.5 special tokens, so tiny
  test checkpoints exercise every path the real vocabulary takes at a fraction of its embedding size;
- ``qwen3_5``: the real Qwen3.5 vocabulary (248,044 BPE ranks + 33 special tokens), converted from
  tiktoken by ``tools/convert_qwen_tokenizer.py`` and shipped as ``assets/qwen3_5_tokenizer.json.lz4``.

Both get Qwen3.5's official chat template (``assets/qwen3_5_chat_template.jinja``) and the
tokenizer_config.json that Qwen3.5 ships.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

# Qwen3.5's special tokens in id order; they follow the 248,044 BPE ranks in the real vocabulary.
QWEN3_5_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<tts_pad>",
    "<tts_text_bos>",
    "<tts_text_eod>",
    "<tts_text_bos_single>",
    "<|audio_pad|>",
)
# Tokens that are part of the text the model reads and writes (not control tokens).
QWEN3_5_NON_SPECIAL = frozenset(
    {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"}
)

# Qwen3.5's pre-tokenizer split (from the model's tokenizer): letters with their marks, single digits.
QWEN3_5_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_SMALL_VOCAB_SIZE = 512
_SMALL_CORPUS = """\
The quick brown fox jumps over the lazy dog. A mixture of experts routes every token to a few experts.
Experts that are not in memory are read from the disk, and the cache keeps the ones used most recently.
def forward(self, x): return self.down_proj(silu(self.gate_proj(x)) * self.up_proj(x))
Hello, world! 1 + 1 = 2. Bonjour le monde. Hallo Welt. こんにちは世界。你好，世界。Привет, мир. 🙂🚀
<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n
The capital of France is Paris.<|im_end|>\n
"""


def _asset(name: str) -> bytes:
    return resources.files("streamer").joinpath("assets", name).read_bytes()


def qwen3_5_chat_template() -> str:
    """Qwen3.5's official chat_template.jinja text (the asset without its provenance comment)."""
    text = _asset("qwen3_5_chat_template.jinja").decode("utf-8")
    if text.startswith("{#"):
        text = text[text.index("#}\n") + 3 :]
    return text


def qwen3_5_tokenizer_json() -> str:
    """The real Qwen3.5 tokenizer.json text (decompressed from the package asset)."""
    import lz4.frame

    return lz4.frame.decompress(_asset("qwen3_5_tokenizer.json.lz4")).decode("utf-8")


def make_small_tokenizer_json() -> str:
    """A deterministic byte-level BPE with the Qwen3.5 special tokens appended, as tokenizer.json text."""
    return train_qwen_bpe(_SMALL_CORPUS.splitlines(), _SMALL_VOCAB_SIZE).to_str()


def train_qwen_bpe(texts, bpe_tokens: int):
    """A byte-level BPE of ``bpe_tokens`` learned tokens, Qwen3.5's normalizer, pre-tokenizer and decoder,
    with the Qwen3.5 special tokens appended after them.

    Returns:
        a ``tokenizers.Tokenizer``.
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN3_5_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens(
        [
            AddedToken(t, special=t not in QWEN3_5_NON_SPECIAL, normalized=False)
            for t in QWEN3_5_SPECIAL_TOKENS
        ]
    )
    return tok


# tokenizer_config.json as the Qwen3.5 checkpoints ship it (transformers 5 layout; the chat template is
# the separate chat_template.jinja).
_VISION_TOKENS = {
    "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
}
_AUDIO_TOKENS = {
    "audio_bos_token": "<|audio_start|>",
    "audio_eos_token": "<|audio_end|>",
    "audio_token": "<|audio_pad|>",
}
QWEN3_5_TOKENIZER_CONFIG = {
    "add_prefix_space": False,
    **_AUDIO_TOKENS,
    "backend": "tokenizers",
    "bos_token": None,
    "clean_up_tokenization_spaces": False,
    "eos_token": "<|im_end|>",
    "errors": "replace",
    "model_max_length": 262144,
    "model_specific_special_tokens": {**_AUDIO_TOKENS, **_VISION_TOKENS},
    "pad_token": "<|endoftext|>",
    "pretokenize_regex": QWEN3_5_PRETOKENIZE_REGEX,
    "split_special_tokens": False,
    "tokenizer_class": "Qwen2Tokenizer",
    "unk_token": None,
    **_VISION_TOKENS,
}


def write_tokenizer_files(dst: Path, kind: str = "small") -> int:
    """Writes tokenizer.json, tokenizer_config.json and chat_template.jinja into ``dst``.

    Args:
        kind: ``"small"`` (a 512-token BPE for tiny test models) or ``"qwen3_5"`` (the real vocabulary).

    Returns:
        The number of tokens (regular + special); the model's vocab_size must be at least this.
    """
    if kind == "small":
        text = make_small_tokenizer_json()
    elif kind == "qwen3_5":
        text = qwen3_5_tokenizer_json()
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r} (expected 'small' or 'qwen3_5')")
    dst = Path(dst)
    (dst / "tokenizer.json").write_text(text, encoding="utf-8")
    (dst / "chat_template.jinja").write_text(qwen3_5_chat_template(), encoding="utf-8")
    (dst / "tokenizer_config.json").write_text(json.dumps(QWEN3_5_TOKENIZER_CONFIG, indent=2) + "\n")
    doc = json.loads(text)
    return len(doc["model"]["vocab"]) + len(doc["added_tokens"])
