"""Structured outputs (vLLM's StructuredOutputsParams): the sampler may only pick tokens a grammar allows.

One of json (a JSON schema), regex, choice, grammar (EBNF) or json_object (any JSON object) per request. Grammars
are compiled by xgrammar (at admission, off the engine loop) against the model's tokenizer; each sequence gets its
own matcher, which fills a bitmask of the allowed next tokens before each sample and takes the sampled token after
it. A sequence whose grammar is complete ends as if it had sampled eos.
"""
from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, fields
from typing import Any, Optional, Union

KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class StructuredOutputsParams:
    json: Optional[Union[str, dict]] = None  # a JSON schema, as text or a dict
    regex: Optional[str] = None
    choice: Optional[list[str]] = None  # the output is exactly one of these strings
    grammar: Optional[str] = None  # EBNF (GBNF dialect), start rule `root`
    json_object: Optional[bool] = None  # any JSON object
    disable_any_whitespace: bool = False  # json / json_object: no free whitespace (xgrammar's ", " and ": " only)
    # The grammar applies from the token after this text appears in the output: a reasoning model's "</think>",
    # set by the server's reasoning parser (vLLM constrains the answer, not the thinking)
    start_after: Optional[str] = None

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def of(cls, value: Any) -> "StructuredOutputsParams":
        """A StructuredOutputsParams, or a dict of its fields (what JSON gives)."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"invalid sampling parameter structured_outputs={value!r}: must be a dict with one of "
                             f"{list(KINDS)}")
        unknown = sorted(set(value) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"invalid sampling parameter structured_outputs: unknown key(s) {unknown}; it takes "
                             f"one of {list(KINDS)}")
        return cls(**value)

    def validate(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"invalid sampling parameter structured_outputs: give exactly one of {list(KINDS)}, "
                             f"got {given or 'none'}")
        if not isinstance(self.disable_any_whitespace, bool):
            raise ValueError("invalid sampling parameter structured_outputs.disable_any_whitespace: must be a bool")
        if self.start_after is not None and not (isinstance(self.start_after, str) and self.start_after):
            raise ValueError("invalid sampling parameter structured_outputs.start_after: must be a non-empty string")
        (kind,) = given
        value = getattr(self, kind)
        ok = {"json": isinstance(value, (str, dict)), "regex": isinstance(value, str),
              "grammar": isinstance(value, str), "json_object": value is True,
              "choice": isinstance(value, list) and bool(value) and all(isinstance(c, str) and c for c in value)}
        if not ok[kind]:
            shape = {"json": "a JSON schema (text or object)", "regex": "a string", "grammar": "an EBNF string",
                     "json_object": "true", "choice": "a non-empty list of non-empty strings"}[kind]
            raise ValueError(f"invalid sampling parameter structured_outputs.{kind}: must be {shape}")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))


class GrammarCompiler:
    """xgrammar's compiler for one tokenizer, made on first use (xgrammar is imported only then)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: tuple[int, ...]):
        self._args = (tokenizer, vocab_size, list(stop_token_ids))  # adallm_core.tokenizer.Tokenizer
        self._compiler = None
        self._lock = threading.Lock()  # admissions run on the callers' threads (AsyncLLM)

    def matcher_factory(self, params: StructuredOutputsParams):
        """The compiled grammar (a ValueError naming the field when it does not compile); call it for a matcher."""
        xgr = _xgrammar()
        with self._lock:
            if self._compiler is None:
                tokenizer, vocab_size, stops = self._args  # its Hugging Face tokenizer, read only now: the
                # benchmarks' random-weight engines run without one
                info = xgr.TokenizerInfo.from_huggingface(tokenizer.hf, vocab_size=vocab_size, stop_token_ids=stops)
                self._compiler = xgr.GrammarCompiler(info)
        kind = params.kind
        try:
            compiled = self._compile(self._compiler, kind, getattr(params, kind), not params.disable_any_whitespace)
        except (RuntimeError, ValueError, TypeError) as e:  # xgrammar's errors for a bad schema, regex or grammar
            reason = re.sub(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?", "", str(e).strip())
            raise ValueError(f"invalid sampling parameter structured_outputs.{kind}: {reason}") from None
        if not _allows_any(xgr, xgr.GrammarMatcher(compiled), self._args[1]):
            # e.g. {"anyOf": []}: the sampler would have no token to pick
            raise ValueError(f"invalid sampling parameter structured_outputs.{kind}: it matches no text at all")
        return lambda: xgr.GrammarMatcher(compiled)

    @staticmethod
    def _compile(compiler, kind: str, value, any_whitespace: bool):
        if kind == "json":
            _refuse_unenforced(value if isinstance(value, dict) else _json_or_none(value))
            schema = value if isinstance(value, str) else json.dumps(value)
            return compiler.compile_json_schema(schema, any_whitespace=any_whitespace)
        if kind == "json_object":
            return compiler.compile_json_schema('{"type": "object"}', any_whitespace=any_whitespace)
        if kind == "regex":
            return compiler.compile_regex(value)
        if kind == "choice":  # alternatives of string literals (JSON's escapes are EBNF's; \uXXXX surrogate pairs
            # are not: characters past U+FFFF stay as they are)
            return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in value))
        return compiler.compile_grammar(value)


# JSON schema keywords xgrammar takes but does not enforce: its grammar lets through JSON that breaks them. A schema
# with one is refused by name (as vLLM's xgrammar backend refuses them), not followed loosely without a word.
UNENFORCED_KEYWORDS = ("not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies",
                       "contains", "minContains", "maxContains")
# where a schema holds subschemas: maps of them, lists of them, or one
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_SUBSCHEMAS = ("items", "additionalProperties", "additionalItems", "unevaluatedProperties", "unevaluatedItems",
               "propertyNames")


def _refuse_unenforced(schema) -> None:
    """A ValueError naming the first part of a JSON schema that xgrammar would not enforce, and where it is."""
    stack = [("#", schema)]  # not recursive: a schema nested as deep as the JSON parser goes stays a 400
    while stack:
        path, node = stack.pop()
        if not isinstance(node, dict):
            continue
        problem = _unenforced(node)
        if problem is not None:
            raise ValueError(f"{problem} (at {path}) is not enforced by the grammar engine (xgrammar): the output "
                             "could break it")
        for key in _SUBSCHEMA_MAPS:
            if isinstance(node.get(key), dict):
                stack += [(f"{path}/{key}/{name}", sub) for name, sub in node[key].items()]
        for key in _SUBSCHEMA_LISTS:
            if isinstance(node.get(key), list):
                stack += [(f"{path}/{key}/{i}", sub) for i, sub in enumerate(node[key])]
        stack += [(f"{path}/{key}", node[key]) for key in _SUBSCHEMAS if key in node]


def _unenforced(node: dict) -> Optional[str]:
    keyword = next((k for k in UNENFORCED_KEYWORDS if k in node), None)
    if keyword is not None:
        return f"'{keyword}'"
    if node.get("uniqueItems") is True:
        return "'uniqueItems'"
    if isinstance(node.get("allOf"), list) and len(node["allOf"]) > 1:  # one is followed; more are not merged
        return "'allOf' with more than one schema"
    ref = node.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#"):  # read as any JSON at all
        return f"'$ref' to {ref!r} (only refs inside the schema, '#/...')"
    types = node.get("type") if isinstance(node.get("type"), list) else [node.get("type")]
    multiple = node.get("multipleOf")
    whole = isinstance(multiple, (int, float)) and not isinstance(multiple, bool) and float(multiple).is_integer()
    if multiple is not None and not (whole and "integer" in types and "number" not in types):
        return "'multipleOf' (only a whole number, on integers)"
    properties, required = node.get("properties"), node.get("required")
    properties = properties if isinstance(properties, dict) else {}
    missing = [n for n in required if isinstance(n, str) and n not in properties] if isinstance(required, list) else []
    if missing:  # a property the grammar never writes: the object comes out without it
        return f"'required' {missing[0]!r}, which 'properties' does not define,"
    return None


def _json_or_none(text):
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # xgrammar's own parse error is the one reported
        return None


# From this many constrained rows a step, their masks are filled on xgrammar's thread pool (a row inside a JSON
# string of a 150k vocabulary takes ~0.1-0.2 ms, one row after another)
BATCH_FILL_ROWS = 8
_batch_matcher = None


def apply_grammars(logits, matchers: list) -> None:
    """Mask (in place) every token a row's matcher does not allow next; rows whose matcher is None are untouched."""
    global _batch_matcher
    xgr = _xgrammar()
    rows = [i for i, m in enumerate(matchers) if m is not None]
    bitmask = xgr.allocate_token_bitmask(len(matchers), logits.shape[1])
    if len(rows) >= BATCH_FILL_ROWS:
        if _batch_matcher is None:  # the engine thread is the only caller
            _batch_matcher = xgr.BatchGrammarMatcher()
        _batch_matcher.batch_fill_next_token_bitmask([matchers[i] for i in rows], bitmask, indices=rows)
    else:
        for i in rows:
            matchers[i].fill_next_token_bitmask(bitmask, i)
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=rows)


def _allows_any(xgr, matcher, vocab_size: int) -> bool:
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    matcher.fill_next_token_bitmask(bitmask)
    return bool(bitmask.any())


def _xgrammar():
    try:
        import xgrammar
    except ImportError as e:
        raise ValueError(f"structured outputs need the xgrammar package ({e}); pip install xgrammar") from None
    return xgrammar
