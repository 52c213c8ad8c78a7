"""Constrained decoding: a sampler that only picks tokens a grammar allows (llguidance).

V = the model's vocabulary (logits [V]); the tokenizer's ids may stop short of V (the embedding is padded),
and padded ids are never allowed.

``Vocabulary`` is the tokenizer as the grammar library sees it (built once per model: about a second for
Qwen3.5's 248k ids). ``Constraint`` compiles one request's grammar against it and refuses a bad one
(``GrammarError``) before any generation starts. ``Constraint.wrap(sampler)`` gives a ``Sampler`` that sets
every token the grammar forbids to -inf before the wrapped sampler picks, then advances the grammar with
the picked token; once the grammar is complete only an end-of-sequence id is left, so the answer ends there.

With ``start_after`` set (the id of ``</think>``), tokens pass unconstrained until that id is sampled: the
model reasons freely and the grammar shapes only the answer after its reasoning.

Grammars are llguidance's Lark dialect; ``json_grammar`` and ``tool_call_grammar`` write the two that the
OpenAI and Anthropic APIs need. JSON is written compactly (no whitespace between tokens), which also keeps
a weak model from spending its budget on blank lines. An integer whose schema sets no bound of its own is
kept within I-JSON's interoperable range (RFC 7493 §2.2: ±(2**53 − 1), at most 16 digits, what any JSON
parser reads exactly), so a weak model cannot spend its budget on digits either; ``number`` is left as
given.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import llguidance
import mlx.core as mx
import numpy as np

from streamer.errors import StreamerError
from streamer.generation.sampling import Sampler

_JSON_OPTIONS = {"whitespace_flexible": False}
# I-JSON (RFC 7493 §2.2): integers beyond ±(2**53 - 1) are not exact in an IEEE 754 double, so not
# interoperable; an integer schema without a bound of its own gets these.
IJSON_MAX_INT = 2**53 - 1
# Keywords whose value is a schema, a list of schemas, or a name -> schema map (JSON Schema 2020-12 and
# draft-07's definitions and additionalItems); the bound is added only where these lead.
_SUBSCHEMA = ("additionalProperties", "items", "additionalItems", "contains", "not", "if", "then", "else",
              "propertyNames", "unevaluatedItems", "unevaluatedProperties")  # fmt: skip
_SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


class GrammarError(StreamerError):
    """A grammar or JSON schema the grammar library cannot compile; the message says why."""


class ConstraintError(StreamerError):
    """The grammar reached a state it cannot leave (an internal error: the mask forbids such tokens)."""


class Vocabulary:
    """A tokenizer in the grammar library's form, with the ids that end an answer.

    Args:
        tokenizer_json: the Hugging Face ``tokenizer.json`` text of the model.
        eos_ids: the end-of-sequence ids (``<|im_end|>``, ``<|endoftext|>``); the first allowed one ends a
            completed grammar.
    """

    def __init__(self, tokenizer_json: str, eos_ids: Iterable[int]):
        self.eos_ids = sorted(eos_ids)
        if not self.eos_ids:
            raise GrammarError("constrained decoding needs the tokenizer's end-of-sequence ids; found none")
        self.ll = llguidance.LLTokenizer(tokenizer_json, eos_token=self.eos_ids)
        self.size = self.ll.vocab_size

    @classmethod
    def from_file(cls, path: str | Path, eos_ids: Iterable[int]) -> Vocabulary:
        return cls(Path(path).read_text(encoding="utf-8"), eos_ids)


class Constraint:
    """One request's compiled grammar (use it for one generation).

    Args:
        vocab: the model's ``Vocabulary``.
        grammar: llguidance Lark text (see ``json_grammar``, ``tool_call_grammar``).
        start_after: a token id; the grammar applies only to the tokens after it is sampled (``</think>``).

    Raises:
        GrammarError: the grammar (or a JSON schema in it) does not compile.
    """

    def __init__(self, vocab: Vocabulary, grammar: str, start_after: int | None = None):
        self.vocab, self.start_after = vocab, start_after
        self.matcher = llguidance.LLMatcher(vocab.ll, grammar, log_level=0)
        if self.matcher.is_error():  # "at 1(8): failed to compile JSON schema: ...", then the grammar
            raise GrammarError(re.sub(r"^at \d+\(\d+\): ", "", self.matcher.get_error().splitlines()[0]))

    def wrap(self, sampler: Sampler) -> ConstrainedSampler:
        return ConstrainedSampler(sampler, self)


class ConstrainedSampler:
    """A ``Sampler`` that masks what the grammar forbids, lets ``inner`` pick, and advances the grammar."""

    def __init__(self, inner: Sampler, constraint: Constraint):
        self.inner, self.matcher = inner, constraint.matcher
        self.eos_id = constraint.vocab.eos_ids[0]
        self.waiting_for = constraint.start_after
        self._words = np.zeros((constraint.vocab.size + 31) // 32, dtype=np.int32)  # one bit per id

    def __call__(self, logits: mx.array) -> int:
        if self.waiting_for is not None:
            token = self.inner(logits)
            if token == self.waiting_for:
                self.waiting_for = None
            return token
        if self.matcher.is_stopped():  # complete, nothing more may follow
            return self.eos_id
        token = self.inner(self.mask(logits))
        if not self.matcher.consume_token(token):
            raise ConstraintError(f"the grammar refused token {token}: {self.matcher.get_error()}")
        return token

    def mask(self, logits: mx.array) -> mx.array:
        """``logits`` [V] with every token the grammar forbids now set to -inf."""
        self.matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        if self.matcher.is_error():
            raise ConstraintError(f"the grammar cannot continue: {self.matcher.get_error()}")
        allowed = np.unpackbits(self._words.view(np.uint8), bitorder="little").astype(bool)  # [32·⌈V/32⌉]
        size = logits.shape[-1]
        if allowed.size < size:  # padded embedding rows: never a real token
            allowed = np.concatenate([allowed, np.zeros(size - allowed.size, dtype=bool)])
        return mx.where(mx.array(allowed[:size]), logits, -mx.inf)


def json_grammar(schema: dict | None = None) -> str:
    """A grammar for one JSON value valid against ``schema`` (None: any JSON object)."""
    return "start: " + _json_rule(schema if schema is not None else {"type": "object"})


def tool_call_grammar(tools: list[dict], names: Iterable[str] | None = None, parallel: bool = True) -> str:
    """A grammar for Qwen3.5 tool calls (the ``<tool_call>`` XML its chat template teaches) to the
    functions ``names`` (None: any of ``tools``), each argument valid against its JSON schema.

    Args:
        tools: OpenAI-form tools, ``{"type": "function", "function": {"name", "parameters"}}``.
        names: the functions a call may name.
        parallel: one or more calls (else exactly one).

    A parameter declared as a string (or with no type) is written as raw text, as the template renders
    it; the text cannot contain ``</`` (it would end the parameter); ``enum``, ``const``, ``minLength`` and
    ``maxLength`` hold (a ``<`` counts as one character with the one after it), ``pattern`` and ``format``
    are not enforced. Other parameters are JSON valid against their schema. Required parameters come in the
    schema's order, each optional one may follow in that order.
    """
    functions = {t["function"]["name"]: t["function"] for t in tools}
    chosen = list(functions) if names is None else list(names)
    rules, alternatives = [], []
    for i, name in enumerate(chosen):
        rules += _function_rules(f"f{i}", functions[name])
        alternatives.append(f"f{i}")
    call = f'call: <tool_call> "\\n" ({" | ".join(alternatives)}) </tool_call>'
    start = 'start: call ("\\n" call)*' if parallel else "start: call"
    return "\n".join([start, call, *rules])


def _function_rules(rule: str, function: dict) -> list[str]:
    schema = function.get("parameters") or {}
    schema = schema if isinstance(schema, dict) else {}
    properties = schema.get("properties") or {}
    # Parameters' schemas may point into the function's shared definitions: each carries them along.
    defs = {k: schema[k] for k in ("$defs", "definitions") if k in schema}
    required = [p for p in properties if p in (schema.get("required") or [])]
    optional = [p for p in properties if p not in required]
    parts, rules = [], []
    for j, param in enumerate([*required, *optional]):
        rules.append(
            f"{rule}_{j}: {_literal(f'<parameter={param}>' + chr(10))} {_value(properties[param], defs)}"
        )
        parts.append(f"{rule}_{j}" + ("?" if param in optional else ""))
    head = _literal(f"<function={function['name']}>\n")
    rules.insert(0, f'{rule}: {head} {" ".join(parts)} "</function>\\n"')
    return rules


_PARAMETER_END = "\n</parameter>\n"


def _value(schema, defs: dict) -> str:
    """The rule text for one parameter's value and the markup that closes it."""
    schema = schema if isinstance(schema, dict) else {}
    declared = schema.get("type")
    types = set(declared) if isinstance(declared, list) else {declared}
    if "string" in types or not types - {None}:
        choices = schema.get("enum") or ([schema["const"]] if "const" in schema else None)
        if choices and all(isinstance(c, str) for c in choices):
            return "(" + " | ".join(_literal(c + _PARAMETER_END) for c in choices) + ")"
        # One regex for the text and its closing markup: no "</" inside, so the first one closes it.
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        count = "*" if not low and high is None else f"{{{low},{'' if high is None else high}}}"
        return rf"/(?:[^<]|<[^\/]){count}\n<\/parameter>\n/"
    return f"{_json_rule({**defs, **schema})} {_literal(_PARAMETER_END)}"


def _json_rule(schema: dict) -> str:
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
    options = {**_JSON_OPTIONS, **schema.get("x-guidance", {})}
    return "%json " + json.dumps({**bound_integers(schema), "x-guidance": options}, ensure_ascii=False)


def bound_integers(schema):
    """``schema`` with every integer schema that sets no bound of its own kept within ±``IJSON_MAX_INT``.

    Only ``"type": "integer"`` (alone or with ``"null"``) without ``enum``/``const`` is touched, and only
    on a missing side (a ``minimum`` or ``exclusiveMinimum`` keeps its own lower end, likewise above; a
    side whose given bound lies past I-JSON's is left as is). Subschemas are found through the keywords
    that hold schemas, never through ``const``, ``enum``, ``default`` or ``examples`` values. Returns a
    copy; ``schema`` is not changed.
    """
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    declared = schema.get("type")
    types = set(declared) if isinstance(declared, list) else {declared}
    if types - {"null"} == {"integer"} and "enum" not in schema and "const" not in schema:
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        high = schema.get("maximum", schema.get("exclusiveMaximum"))
        numeric = (int, float)
        if low is None and not (isinstance(high, numeric) and high < -IJSON_MAX_INT):
            out["minimum"] = -IJSON_MAX_INT
        if high is None and not (isinstance(low, numeric) and low > IJSON_MAX_INT):
            out["maximum"] = IJSON_MAX_INT
    for key in _SUBSCHEMA:
        if isinstance(schema.get(key), dict):
            out[key] = bound_integers(schema[key])
    for key in _SUBSCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            out[key] = [bound_integers(s) for s in schema[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            out[key] = {name: bound_integers(s) for name, s in schema[key].items()}
    return out


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)
