"""Tokenizer files that synthetic checkpoints ship with.

Two vocabularies:
- ``small``: a byte-level BPE trained on a fixed built-in text, with the Qwen3.5 special tokens, so tiny
  test checkpoints exercise every path the real vocabulary takes at a fraction of its embedding size;
- ``qwen3_5``: the real Qwen3.5 vocabulary (see ``tools/convert_qwen_tokenizer.py``).
"""

from __future__ import annotations

import json
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
_NON_SPECIAL = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"}

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

_MINIMAL_CHAT_TEMPLATE = """\
{%- for message in messages %}
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}
{{- '<think>\\n\\n</think>\\n\\n' }}
{%- else %}
{{- '<think>\\n' }}
{%- endif %}
{%- endif %}
"""


def make_small_tokenizer_json() -> str:
    """A deterministic byte-level BPE with the Qwen3.5 special tokens appended, as tokenizer.json text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN3_5_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_SMALL_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_SMALL_CORPUS.splitlines(), trainer=trainer)
    _add_special_tokens(tok)
    return tok.to_str()


def _add_special_tokens(tok) -> None:
    from tokenizers import AddedToken

    tok.add_special_tokens(
        [AddedToken(t, special=t not in _NON_SPECIAL, normalized=False) for t in QWEN3_5_SPECIAL_TOKENS]
    )


def write_tokenizer_files(dst: Path, kind: str = "small") -> int:
    """Writes tokenizer.json, tokenizer_config.json and chat_template.jinja into ``dst``.

    Returns:
        The number of tokens (regular + special); the model's vocab_size must be at least this.
    """
    if kind != "small":
        raise ValueError(f"unknown tokenizer kind {kind!r} (expected 'small')")
    text = make_small_tokenizer_json()
    dst = Path(dst)
    (dst / "tokenizer.json").write_text(text)
    (dst / "chat_template.jinja").write_text(_MINIMAL_CHAT_TEMPLATE)
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": 262144,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "add_prefix_space": False,
        "errors": "replace",
        "split_special_tokens": False,
    }
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return len(json.loads(text)["model"]["vocab"]) + len(QWEN3_5_SPECIAL_TOKENS)
