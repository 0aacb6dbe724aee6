"""Structured outputs: a request's output held to a JSON schema, any JSON object, a regular
expression, a choice of strings or a grammar (Lark or GBNF), as vLLM's StructuredOutputsParams.

llguidance does the work: it compiles the constraint against the tokenizer's vocabulary into
a matcher, which gives the bitmask of the tokens allowed next ([vocab / 32] int32, bit i of
word w allows token 32 w + i) and consumes each sampled token. Host side, plain Python; the
sampler applies the bitmask inside the jitted step (sampler.py). One matcher per sequence
(Request.matcher), copied from a template compiled once per constraint and kept in an LRU
cache, so a schema that many requests share is compiled once, and the server compiles on its
tokenizer thread, never on the engine's.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import threading
from typing import Any, Sequence

_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclasses.dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one of the constraints. json: a JSON schema (a dict, or its JSON text);
    json_object: any JSON object; regex: the whole output matches it; choice: the output is
    one of these strings; grammar: a Lark or GBNF grammar (llguidance's dialects).
    disable_any_whitespace: JSON without whitespace between its tokens (vLLM's flag; by
    default JSON may hold whitespace wherever JSON allows it)."""
    json: dict | str | None = None
    regex: str | None = None
    choice: Sequence[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self):
        given = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured_outputs takes exactly one of {', '.join(_KINDS)}; "
                             f"got {', '.join(given) if given else 'none'}")
        if isinstance(self.json, str):
            try:
                schema = json.loads(self.json)
            except json.JSONDecodeError as err:
                raise ValueError(f"structured_outputs.json is not valid JSON: {err}") from None
            object.__setattr__(self, "json", schema)
        if self.json is not None and not isinstance(self.json, dict):
            raise ValueError(f"structured_outputs.json must be a JSON schema object, got "
                             f"{type(self.json).__name__}")
        if self.choice is not None:
            choice = [self.choice] if isinstance(self.choice, str) else list(self.choice)
            if not choice or not all(isinstance(c, str) for c in choice):
                raise ValueError("structured_outputs.choice must be a non-empty list of "
                                 "strings")
            object.__setattr__(self, "choice", tuple(choice))
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"structured_outputs.{name} must be a string, got "
                                 f"{type(value).__name__}")

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    def grammar_text(self, disable_any_whitespace: bool = False) -> str:
        """llguidance's grammar for the constraint (compiled by GrammarCompiler);
        disable_any_whitespace: the engine's default, which the request's flag adds to."""
        import llguidance

        compact = self.disable_any_whitespace or disable_any_whitespace
        options = {"whitespace_flexible": not compact}
        if self.json is not None:
            return llguidance.LLMatcher.grammar_from_json_schema(self.json, defaults=options)
        if self.json_object:
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"},
                                                                  defaults=options)
        if self.regex is not None:
            return llguidance.LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            return llguidance.grammar_from("choice", json.dumps(list(self.choice)))
        return llguidance.grammar_from("grammar", self.grammar)

    def cache_key(self, disable_any_whitespace: bool = False) -> str:
        return json.dumps([self.kind, getattr(self, self.kind),
                           self.disable_any_whitespace or disable_any_whitespace],
                          sort_keys=True)


class GrammarCompiler:
    """Compiles constraints for one tokenizer into matcher templates, cached by constraint.
    Thread-safe: the server compiles on its tokenizer thread, the engine copies templates on
    its own."""

    def __init__(self, tokenizer, vocab_size: int, disable_any_whitespace: bool = False,
                 cache_size: int = 256):
        """disable_any_whitespace: JSON constraints allow no whitespace between tokens, for
        every request (vLLM's structured_outputs_config.disable_any_whitespace)."""
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.disable_any_whitespace = disable_any_whitespace
        self._ll_tokenizer = None  # built on first use (about a second for 49k tokens)
        self._templates: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @property
    def mask_width(self) -> int:
        """int32 words of a bitmask row: one bit a vocabulary entry."""
        return (self.vocab_size + 31) // 32

    def _tokenizer(self):
        if self._ll_tokenizer is None:
            import llguidance.hf

            self._ll_tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer,
                                                              n_vocab=self.vocab_size)
        return self._ll_tokenizer

    def template(self, params: StructuredOutputsParams):
        """The compiled matcher for the constraint, from the cache or compiled now; raises
        ValueError naming why a constraint cannot compile. Copy it (new_matcher) before use."""
        key = params.cache_key(self.disable_any_whitespace)
        with self._lock:
            if key in self._templates:
                self._templates.move_to_end(key)
                return self._templates[key]
            tokenizer = self._tokenizer()
        import llguidance

        try:
            grammar = params.grammar_text(self.disable_any_whitespace)
        except (ValueError, TypeError) as err:
            raise ValueError(f"structured_outputs.{params.kind} cannot be used: {err}") from None
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"structured_outputs.{params.kind} cannot be compiled: "
                             f"{matcher.get_error()}")
        with self._lock:
            self._templates[key] = matcher
            while len(self._templates) > self._cache_size:
                self._templates.popitem(last=False)
        return matcher

    def new_matcher(self, params: StructuredOutputsParams):
        """A fresh matcher for one sequence."""
        return self.template(params).deep_copy()


def fill_bitmask(matcher, drafts: Sequence[int], mask, row: int) -> None:
    """Rows row .. row + len(drafts) of mask: the tokens the matcher allows now, and after each
    of the drafts in turn (a drafting row verifies them one position each); the matcher is
    left where it was. Positions past a draft the grammar refuses are never reached (that
    draft is masked out, so rejected): they repeat the mask of its position."""
    import llguidance.numpy

    valid = matcher.validate_tokens(list(drafts))  # consuming a refused token is fatal
    for j in range(valid + 1):
        llguidance.numpy.fill_next_token_bitmask(matcher, mask, row + j)
        if j < valid:
            matcher.consume_token(drafts[j])
    if valid:
        matcher.rollback(valid)
    mask[row + valid + 1:row + len(drafts) + 1] = mask[row + valid]
