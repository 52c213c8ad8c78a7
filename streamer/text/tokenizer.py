"""The checkpoint's tokenizer: `tokenizers` for ids, jinja2 for the chat template, streaming detokenizing.

Reads ``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja`` (or the template inside
tokenizer_config.json) and ``generation_config.json`` from a checkpoint or packed directory.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from streamer.errors import CheckpointError


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(value, indent=None, ensure_ascii=False, sort_keys=False):
    # transformers' tojson filter: no HTML escaping, unicode kept as is.
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def make_template_environment() -> jinja2.Environment:
    """A jinja2 environment configured as transformers renders chat templates."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    return env


class Tokenizer:
    """Encodes text, renders the chat template and decodes ids of one checkpoint."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise CheckpointError(f"{path}: no tokenizer.json (every mlx-community checkpoint has one)")
        self._tok = HFTokenizer.from_file(str(tokenizer_file))
        config = _read_json(path / "tokenizer_config.json")
        generation = _read_json(path / "generation_config.json")
        template = path / "chat_template.jinja"
        self.chat_template = template.read_text() if template.is_file() else config.get("chat_template")
        self._template = None
        self.eos_token_ids = self._eos_ids(config, generation)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.generation_config = generation  # sampling defaults (see sampling.default_sampling_params)
        self._byte_level = type(self._tok.decoder).__name__ == "ByteLevel"
        self._special_ids = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self._bytes: dict[int, bytes] = {}

    def _eos_ids(self, config: dict, generation: dict) -> set[int]:
        ids = generation.get("eos_token_id", [])
        ids = set(ids if isinstance(ids, list) else [ids])
        eos = config.get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if eos and (i := self._tok.token_to_id(eos)) is not None:
            ids.add(i)
        return ids

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens written in the text are recognised."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = True,
        enable_thinking: bool = True,
        tools: list[dict] | None = None,
        **kwargs,
    ) -> str:
        """Renders ``messages`` with the checkpoint's own chat template."""
        if self.chat_template is None:
            raise CheckpointError("this checkpoint has no chat template; use raw prompts (--raw)")
        if self._template is None:
            self._template = make_template_environment().from_string(self.chat_template)
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
            tools=tools,
            **kwargs,
        )

    def detokenizer(self, skip_special_tokens: bool = False) -> StreamingDetokenizer:
        return StreamingDetokenizer(self, skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one id decodes to (part of a character for byte-level BPE), as ``decode`` joins them.

        Ids past the tokenizer's vocabulary (the model's embedding is padded beyond it) decode to nothing,
        as ``decode`` skips them.
        """
        cached = self._bytes.get(token_id)
        if cached is None:
            piece = self._tok.id_to_token(token_id)
            cached = self._bytes[token_id] = b"" if piece is None else self._piece_bytes(piece)
        return cached

    def _piece_bytes(self, piece: str) -> bytes:
        # tokenizers' ByteLevel decoder: map every char back to its byte, or keep the piece's own UTF-8
        # when some char is outside the table (added tokens such as "<think>" map to themselves anyway).
        if not self._byte_level:
            raise CheckpointError(
                f"streaming decode needs a ByteLevel tokenizer decoder (every Qwen3.5 checkpoint has one); "
                f"this tokenizer.json has {type(self._tok.decoder).__name__}"
            )
        try:
            return bytes(_BYTE_OF_CHAR[c] for c in piece)
        except KeyError:
            return piece.encode()

    def is_special(self, token_id: int) -> bool:
        """True for the ids that ``decode(..., skip_special_tokens=True)`` drops (``<|im_end|>`` etc.)."""
        return token_id in self._special_ids


class StreamingDetokenizer:
    """Turns ids into text pieces as they arrive, never emitting part of a UTF-8 character.

    Byte-level BPE splits multi-byte characters (emoji, CJK) across tokens. The bytes of each id go
    through an incremental UTF-8 decoder: an incomplete character is held back until the following
    tokens complete it; bytes that can never form a character come out as U+FFFD, as ``decode`` gives.
    The pieces joined equal ``tokenizer.decode(ids, skip_special_tokens)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._skip_special = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        """Adds one id; returns the new text that is now safe to show (possibly empty)."""
        if self._skip_special and self._tok.is_special(token_id):
            return ""
        return self._utf8.decode(self._tok.token_bytes(token_id))

    def finalize(self) -> str:
        """Flushes bytes held back at the end (an unfinished character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable char table, which byte-level BPE vocabularies are written in."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
