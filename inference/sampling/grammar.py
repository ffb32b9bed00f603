"""Structured output (`response_format`): a grammar per request, a token mask per step, with llguidance.

- `GrammarCompiler` (one per local engine): the engine's tokenizer as an llguidance `LLTokenizer` (built at the first
  constrained request, ~0.3 s for the embedded model; its EOS tokens are the engine's terminators), and a cache of
  compiled grammars keyed by the `ResponseFormat` (LRU, `CACHE_SIZE` entries). A cache entry is a compiled matcher
  that never consumes a token; each request gets a `deep_copy()` of it, so a cached format compiles nothing.
- `compile` raises `InvalidRequest` naming the problem (a schema llguidance cannot build), at `submit`, before the
  first response byte.
- `RowGrammar`: one request's matcher. Each step `apply_masks` masks the constrained rows of the logits (the rows
  without a grammar are not touched), the row's token is chosen as usual, and `advance` consumes it. When the
  grammar is complete (no byte may follow) the row ends with finish "stop"; EOS is allowed only once the grammar
  accepts (llguidance's mask).

`json_object` is the schema `{"type": "object"}`; `json_schema` with `strict: true` is compiled strictly: keywords
llguidance cannot enforce are an error, and objects without `additionalProperties` get `false` (OpenAI's strict
mode); `strict: false` ignores unsupported keywords (`lenient`) and keeps JSON Schema's defaults. Whitespace between
JSON tokens is not allowed (compact JSON), so a small model cannot wander off into blank lines.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from inference.types import InvalidRequest, ResponseFormat

logger = logging.getLogger(__name__)

CACHE_SIZE = 64  # compiled grammars kept (least recently used dropped first)
JSON_OBJECT_SCHEMA = '{"type": "object"}'

# Keywords whose values are maps of subschemas, and keywords whose values are subschemas (or lists of them).
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMAS = (
    "additionalProperties",
    "unevaluatedProperties",
    "propertyNames",
    "items",
    "prefixItems",
    "additionalItems",
    "contains",
    "allOf",
    "anyOf",
    "oneOf",
    "not",
    "if",
    "then",
    "else",
)


class InvalidResponseFormat(InvalidRequest):
    """A `response_format` the engine cannot enforce (a 400 naming the field)."""

    param = "response_format"


def _close_objects(schema: Any) -> None:
    """OpenAI's strict mode: an object schema that lists properties and says nothing of others allows no others."""
    if isinstance(schema, list):
        for item in schema:
            _close_objects(item)
        return
    if not isinstance(schema, dict):
        return
    for key in _SCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            for sub in schema[key].values():
                _close_objects(sub)
    for key in _SUBSCHEMAS:
        if isinstance(schema.get(key), dict | list):
            _close_objects(schema[key])
    if "additionalProperties" not in schema and isinstance(schema.get("properties"), dict):
        schema["additionalProperties"] = False


def openai_response_format(response_format: ResponseFormat) -> dict[str, Any]:
    """The OpenAI `response_format` body field for `response_format` (the remote engine forwards it upstream)."""
    if response_format.kind == "json_object":
        return {"type": "json_object"}
    return {
        "type": "json_schema",
        "json_schema": {
            "name": response_format.name,
            "schema": json.loads(response_format.schema or "{}"),
            "strict": response_format.strict,
        },
    }


def grammar_text(response_format: ResponseFormat) -> str:
    """The llguidance grammar (JSON text) for `response_format`; `InvalidRequest` if the schema is not usable."""
    import llguidance

    if response_format.kind == "json_object":
        schema: Any = JSON_OBJECT_SCHEMA
        options: dict[str, Any] = {}
    else:
        try:
            schema = json.loads(response_format.schema or "")
        except ValueError as error:
            raise InvalidResponseFormat(f"response_format: json_schema.schema is not valid JSON ({error})") from None
        if not isinstance(schema, dict):
            raise InvalidResponseFormat("response_format: json_schema.schema must be a JSON object")
        if response_format.strict:
            _close_objects(schema)
        schema = json.dumps(schema)  # as text: llguidance's own JSON parser refuses what is not valid text
        options = {"lenient": not response_format.strict}
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False}, overrides=options or None
        )
    except ValueError as error:
        raise InvalidResponseFormat(f"response_format: json_schema.schema is not usable: {error}") from None


class RowGrammar:
    """One request's grammar state: its own matcher, advanced by the tokens the row emits."""

    def __init__(self, matcher: Any, compiler: GrammarCompiler) -> None:
        self.matcher = matcher
        self.compiler = compiler
        self.done = False  # the grammar is complete: the row ends

    def fill(self, bitmask: Any, index: int) -> None:
        """Write the allowed next tokens into row `index` of `bitmask` (int32, one bit per token)."""
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(self.matcher, bitmask, index)

    def advance(self, token: int) -> bool:
        """Consume the emitted `token`; True once the grammar is complete (the row should end with "stop")."""
        if self.done:
            return True
        if token in self.compiler.eos_tokens:
            self.done = True
            return True
        if not self.matcher.consume_token(token):
            # Never expected (the token was masked): the matcher now allows only EOS; end the row.
            reason = (self.matcher.get_error().splitlines() or ["?"])[0]  # the rest is parser state and grammar
            logger.warning("constrained decoding: token %d refused: %s", token, reason)
        self.done = self.matcher.is_stopped()
        return self.done


class GrammarCompiler:
    """The engine's tokenizer for llguidance and its cache of compiled grammars (thread-safe)."""

    def __init__(self, tokenizer: Any, terminators: Sequence[int], vocab_size: int) -> None:
        self._hf_tokenizer = tokenizer
        self.eos_tokens = frozenset(terminators)
        self._terminators = list(terminators)
        self.vocab_size = vocab_size  # the width of the logits the masks apply to
        self._ll_tokenizer: Any = None
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
        self.compiled = 0  # grammars compiled (cache misses)
        self.cache_hits = 0
        self.last_compile_s = 0.0

    @property
    def ll_tokenizer(self) -> Any:
        if self._ll_tokenizer is None:
            import llguidance.hf

            try:
                n_vocab = max(self.vocab_size, len(self._hf_tokenizer))
                self._ll_tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=n_vocab, eos_token=self._terminators
                )
            except Exception as error:  # e.g. a slow (Python) tokenizer: llguidance takes fast ones only
                raise InvalidResponseFormat(
                    f"response_format is not available for this model's tokenizer ({type(error).__name__}: {error})"
                ) from None
        return self._ll_tokenizer

    @staticmethod
    def cache_key(response_format: ResponseFormat) -> tuple:
        if response_format.kind == "json_object":
            return ("json_object",)
        return ("json_schema", response_format.schema, response_format.strict)

    def compile(self, response_format: ResponseFormat) -> RowGrammar:
        """A fresh matcher for one request; compiled once per distinct format, then copied from the cache."""
        import llguidance

        key = self.cache_key(response_format)
        with self._lock:
            template = self._cache.get(key)
            if template is not None:
                self._cache.move_to_end(key)
                self.cache_hits += 1
                return RowGrammar(template.deep_copy(), self)
            started = time.perf_counter()
            tokenizer = self.ll_tokenizer
            grammar = grammar_text(response_format)
            error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
            if error:
                raise InvalidResponseFormat(f"response_format: the JSON schema cannot be enforced: {error.strip()}")
            template = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
            if template.is_error():
                raise InvalidResponseFormat(
                    f"response_format: the JSON schema cannot be enforced: {template.get_error()}"
                )
            self.last_compile_s = time.perf_counter() - started
            self.compiled += 1
            self._cache[key] = template
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
            return RowGrammar(template.deep_copy(), self)


def apply_masks(scores: Any, rows: Iterable[tuple[int, RowGrammar]]) -> None:
    """Mask, in place, the disallowed tokens of the constrained `rows` (row index, grammar) of `scores` to -inf.

    One bitmask (int32, a bit per token) for those rows only, filled by llguidance, then unpacked. On CPU the
    unpacking and the masking run in numpy, on the scores' own memory: torch would run each of these 50k-element
    operations as an OpenMP parallel region, which on a loaded 2-core machine cost ~70 ms each (measured) instead of
    ~0.03 ms single-threaded. Unconstrained rows are not touched.
    """
    import numpy as np
    import torch

    rows = list(rows)
    if not rows:
        return
    compiler = rows[0][1].compiler
    vocab = compiler.ll_tokenizer.vocab_size
    bitmask = torch.empty((len(rows), (vocab + 31) // 32), dtype=torch.int32)
    for index, (_row, grammar) in enumerate(rows):
        grammar.fill(bitmask, index)
    # Bit j of int32 word i is token 32 * i + j (little-endian words and bits).
    allowed = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little").view(bool)
    width = scores.shape[-1]
    if allowed.shape[1] < width:  # logits wider than the tokenizer's vocabulary: the extra ids are never allowed
        allowed = np.pad(allowed, ((0, 0), (0, width - allowed.shape[1])))
    allowed = allowed[:, :width]
    if scores.device.type == "cpu":
        for index, (row, _grammar) in enumerate(rows):
            values = scores[row].numpy()  # shares the tensor's memory
            values[~allowed[index]] = -np.inf
        return
    refused = torch.from_numpy(~allowed).to(scores.device, non_blocking=True)
    for index, (row, _grammar) in enumerate(rows):
        scores[row].masked_fill_(refused[index], float("-inf"))
