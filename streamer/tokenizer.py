"""The checkpoint's tokenizer: `tokenizers` for ids, jinja2 for the chat template, streaming detokenizing.

Reads ``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja`` (or the template inside
tokenizer_config.json) and ``generation_config.json`` from a checkpoint or packed directory.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import CheckpointError


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

    def detokenizer(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(self)


class StreamingDetokenizer:
    """Turns ids into text pieces as they arrive, never emitting a broken UTF-8 character.

    Byte-level BPE splits multi-byte characters across tokens; a piece ending in U+FFFD is held back
    until the following tokens complete it (or ``finalize`` flushes it).
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._emitted = ""

    def add(self, token_id: int) -> str:
        """Adds one id; returns the new text that is now safe to show (possibly empty)."""
        self._ids.append(token_id)
        text = self._tok.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        return self._take(text)

    def finalize(self) -> str:
        return self._take(self._tok.decode(self._ids))

    def _take(self, text: str) -> str:
        new = text[len(self._emitted) :] if text.startswith(self._emitted) else text
        self._emitted = text
        # Keep the decode window short: restart after a clean boundary.
        if len(self._ids) > 16:
            self._ids, self._emitted = [], ""
        return new


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
