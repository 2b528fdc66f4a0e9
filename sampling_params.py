"""Per-request sampling parameters (vLLM names and defaults).

`SamplingParams` crosses process boundaries msgpack-encoded; msgspec calls `__post_init__` again
on decode, so validation is plain comparisons and normalisation is idempotent.
"""

from __future__ import annotations

import enum
import importlib
import json
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from conveyor.config import RequestLimits, _check

GREEDY_TEMPERATURE = 1e-5  # temperatures below this sample greedily (as vLLM)
DEFAULT_MAX_TOKENS = 16  # vLLM's
# What the later stages hold: counts, lengths and token ids go into int32 tensors, floats into
# float32 ones, seeds into a torch.Generator (int64, vLLM's range), everything through msgpack.
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.1754943508222875e-38  # the smallest normal float32


class RequestOutputKind(enum.IntEnum):
    CUMULATIVE = 0  # every output carries the whole text / tokens so far
    DELTA = 1  # every output carries only what is new since the previous one
    FINAL_ONLY = 2  # one output, when the request finishes


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_token_id(x: Any) -> bool:
    return _is_int(x) and 0 <= x <= INT32_MAX


def _is_token_id_list(x: Any) -> bool:
    return isinstance(x, list) and all(_is_token_id(t) for t in x)


# The rules of one kind, field by field: types first, so that the ranges compare numbers.
_INT_FIELDS = ("n", "top_k", "no_repeat_ngram_size", "min_tokens")
_NUMBER_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty", "length_penalty")
_BOOL_FIELDS = ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens",
                "spaces_between_special_tokens", "detokenize", "use_beam_search", "early_stopping")
# field -> (low, high, the allowed values in words); None passes where it is the field's default
_INT_RANGES = {name: (low, high, f"an int in [{low}, {high}]") for name, (low, high) in {
    "n": (1, INT32_MAX), "seed": (INT64_MIN, INT64_MAX), "no_repeat_ngram_size": (0, INT32_MAX),
    "max_tokens": (1, INT32_MAX), "min_tokens": (0, INT32_MAX), "logprobs": (0, INT32_MAX),
    "prompt_logprobs": (0, INT32_MAX),
}.items()}
_FLOAT_RANGES = {name: (low, high, f"in [{low:g}, {high:g}]") for name, (low, high) in {
    "temperature": (0.0, FLOAT32_MAX), "min_p": (0.0, 1.0), "repetition_penalty": (FLOAT32_TINY, FLOAT32_MAX),
    "presence_penalty": (-2.0, 2.0), "frequency_penalty": (-2.0, 2.0),
    # beam search divides by generated_length ** length_penalty, with lengths up to 2**31
    "length_penalty": (-10.0, 10.0),
}.items()}
_TOKEN_IDS = f"token ids in [0, {INT32_MAX}]"
_TOKEN_ID_LIST = f"a list of {_TOKEN_IDS}"
_LOGIT_BIAS = f"a map of {_TOKEN_IDS} to biases in [-100, 100]"
_EOS_TOKEN_ID = f"a token id in [0, {INT32_MAX}] or None"
_TOP_K = f"-1 (disabled), 0 (disabled) or in [1, {INT32_MAX}]"


def resolve_max_tokens(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> int:
    """How many tokens a request may generate: `max_tokens`, or where None all that max_model_len
    leaves after the prompt. The frontend and the engine core both refuse a request by this rule."""
    room = max_model_len - num_prompt_tokens
    if num_prompt_tokens < 1 or room < 1:
        raise ValueError(f"prompt must be 1 to {max_model_len - 1} tokens long (max_model_len {max_model_len} "
                         f"less one output token), got {num_prompt_tokens} tokens")
    if max_tokens is None:
        return room
    _check(1 <= max_tokens <= room, "max_tokens", max_tokens,
           f"in [1, {room}] (max_model_len {max_model_len} less the prompt's {num_prompt_tokens} tokens)")
    return max_tokens


def child_seed(seed: int | None, index: int) -> int | None:
    """The seed of sample `index` of an n > 1 request: seed + index, wrapped into int64."""
    if seed is None:
        return None
    return (seed + index - INT64_MIN) % 2**64 + INT64_MIN


class StructuredOutputsParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A constraint on the output, enforced token by token (vLLM's names): exactly one of a JSON
    schema (a dict, or its JSON text), a regular expression, a list of choices, an EBNF grammar
    (GBNF, as llama.cpp writes it), or `json_object=True` (any JSON object)."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        given = [name for name in STRUCTURED_OUTPUT_KINDS if getattr(self, name) not in (None, False)]
        _check(len(given) == 1, "structured_outputs", given or None,
               f"exactly one of {', '.join(STRUCTURED_OUTPUT_KINDS)}")
        _check(self.json is None or isinstance(self.json, (str, dict)), "structured_outputs.json", self.json,
               "a JSON schema: a dict or its JSON text")
        if isinstance(self.json, str):
            try:
                schema = json.loads(self.json)
            except ValueError as e:
                raise ValueError(f"structured_outputs.json must be a JSON schema, got text that is not JSON: {e}") \
                    from None
            _check(isinstance(schema, (dict, bool)), "structured_outputs.json", self.json, "a JSON schema (an object)")
        elif isinstance(self.json, dict):
            try:  # it travels as msgpack and is keyed as JSON text
                json.dumps(self.json, sort_keys=True)
                msgspec.msgpack.encode(self.json)
            except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as e:
                raise ValueError(f"structured_outputs.json must be a JSON schema of JSON values (string keys, "
                                 f"integers within int64), got one that is not: {e}") from None
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            _check(value is None or isinstance(value, str) and value, f"structured_outputs.{name}", value,
                   "a non-empty string")
        _check(self.choice is None or isinstance(self.choice, list) and self.choice
               and all(isinstance(c, str) and c for c in self.choice),
               "structured_outputs.choice", self.choice, "a non-empty list of non-empty strings")
        _check(self.json_object in (None, True, False), "structured_outputs.json_object", self.json_object,
               "true or absent")

    @property
    def kind(self) -> str:
        return next(name for name in STRUCTURED_OUTPUT_KINDS if getattr(self, name) not in (None, False))

    def key(self) -> tuple[str, str]:
        """(kind, spec as text): equal constraints have equal keys (a schema's keys sorted)."""
        kind = self.kind
        value = getattr(self, kind)
        if kind == "json":
            value = json.dumps(json.loads(value) if isinstance(value, str) else value, sort_keys=True)
        elif kind == "choice":
            value = json.dumps(value)
        elif kind == "json_object":
            value = ""
        return kind, value


STRUCTURED_OUTPUT_KINDS = ("json", "regex", "choice", "grammar", "json_object")


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    max_tokens: int | None = DEFAULT_MAX_TOKENS  # None: up to max_model_len (resolve_max_tokens)
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: str | list[str] = msgspec.field(default_factory=list)
    stop_token_ids: list[int] = msgspec.field(default_factory=list)
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # Beam search: `n` is the beam width; beams are scored by raw log-probabilities.
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool = False
    # Import paths "pkg.module:callable" or "pkg.module.callable"; each is applied in the worker as
    # fn(output_token_ids: list[int], logits_row: Tensor) -> Tensor.
    logits_processors: list[str] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    # Speculative decoding: the caller's guess of the first output tokens. The engine verifies them
    # in its next step and keeps those the model would have produced itself, so the output is the
    # same with or without them; only the number of steps changes.
    draft_token_ids: list[int] | None = None

    # Internal, filled by the frontend (`bind_tokenizer`).
    bad_words_token_ids: list[list[int]] | None = None
    eos_token_id: int | None = None
    # the grammar of structured_outputs, compiled for the model's tokenizer (xgrammar's JSON)
    compiled_grammar: str | None = None
    # Derived in __post_init__: stop_token_ids plus eos unless ignore_eos.
    all_stop_token_ids: list[int] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.top_k == -1:
            self.top_k = 0
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if _is_int(self.temperature):
            self.temperature = float(self.temperature)
        self._validate()
        # float32 has no top_p this small (the sampler would drop every token); any top_p below
        # the most likely token's probability keeps that token alone
        self.top_p = max(self.top_p, FLOAT32_TINY)
        self._derive_stop_ids()

    # -- derived views ---------------------------------------------------------------------------

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.use_beam_search

    def bind_tokenizer(
        self,
        tokenizer: Any,
        eos_token_id: int | Sequence[int] | None,
        vocab_size: int | None = None,
    ) -> SamplingParams:
        """Fill the internal fields from `tokenizer` and check every token id against the vocab.

        `eos_token_id` may be a list (generation configs with several EOS ids): the first becomes
        `eos_token_id`, the others join `stop_token_ids` unless `ignore_eos`.
        `vocab_size` defaults to `len(tokenizer)`; pass the model's (possibly larger) vocab size.
        """
        if vocab_size is None:
            vocab_size = len(tokenizer)
        eos_ids = [] if eos_token_id is None else (
            [eos_token_id] if _is_int(eos_token_id) else list(eos_token_id))
        self.eos_token_id = eos_ids[0] if eos_ids else None
        if not self.ignore_eos:
            for t in eos_ids[1:]:
                if t not in self.stop_token_ids:
                    self.stop_token_ids.append(t)
        if self.bad_words:
            self.bad_words_token_ids = _tokenize_bad_words(tokenizer, self.bad_words)
        checks: list[tuple[str, Any]] = [
            ("stop_token_ids", self.stop_token_ids),
            ("allowed_token_ids", self.allowed_token_ids or ()),
            ("logit_bias", list(self.logit_bias or ())),
            ("bad_words", [t for ids in self.bad_words_token_ids or () for t in ids]),
            ("eos_token_id", eos_ids),
            ("draft_token_ids", self.draft_token_ids or ()),
        ]
        for name, ids in checks:
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(
                    f"{name} holds token ids outside the vocabulary [0, {vocab_size}): {bad}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value > vocab_size:
                raise ValueError(f"{name} must be in [0, {vocab_size}] (the vocabulary size), got {value}")
        self._derive_stop_ids()
        return self

    def check_limits(self, limits: RequestLimits) -> None:
        """Refuse a request that asks for more work than `limits` allow one request."""
        counts = [("n", self.n, "max_n", ""),
                  ("logprobs", self.logprobs or 0, "max_logprobs", ""),
                  ("prompt_logprobs", self.prompt_logprobs or 0, "max_logprobs", ""),
                  ("stop", len(self.stop), "max_stop", " strings"),
                  ("logit_bias", len(self.logit_bias or ()), "max_logit_bias", " entries"),
                  ("bad_words", len(self.bad_words or ()), "max_bad_words", " words"),
                  ("draft_token_ids", len(self.draft_token_ids or ()), "max_draft_tokens", " tokens")]
        for name, value, limit_name, unit in counts:
            limit = getattr(limits, limit_name)
            if value > limit:
                what = f"hold at most {limit}{unit}" if unit else f"be at most {limit}"
                raise ValueError(f"{name} must {what} (request limit {limit_name}), got {value}")

    # -- internals -------------------------------------------------------------------------------

    def _derive_stop_ids(self) -> None:
        ids = list(self.stop_token_ids)
        if not self.ignore_eos and self.eos_token_id is not None and self.eos_token_id not in ids:
            ids.append(self.eos_token_id)
        self.all_stop_token_ids = ids
        allowed = self.allowed_token_ids
        if allowed is not None and self.min_tokens:
            _check(not set(allowed) <= set(ids), "min_tokens", self.min_tokens,
                   f"0 when allowed_token_ids holds only stop tokens ({allowed}): no other token could be sampled")

    def _validate(self) -> None:
        for name in _INT_FIELDS:
            _check(_is_int(value := getattr(self, name)), name, value, "an int")
        for name in _NUMBER_FIELDS:
            _check(_is_number(value := getattr(self, name)) and value == value, name, value, "a number")
        for name in _BOOL_FIELDS:
            _check(isinstance(value := getattr(self, name), bool), name, value, "a bool")
        for name, (low, high, allowed) in _INT_RANGES.items():
            value = getattr(self, name)
            _check(value is None or _is_int(value) and low <= value <= high, name, value, allowed)
        for name, (low, high, allowed) in _FLOAT_RANGES.items():
            _check(low <= (value := getattr(self, name)) <= high, name, value, allowed)
        _check(0.0 < self.top_p <= 1.0, "top_p", self.top_p, "in (0, 1]")
        _check(0 <= self.top_k <= INT32_MAX, "top_k", self.top_k, _TOP_K)
        if self.max_tokens is not None:
            _check(self.min_tokens <= self.max_tokens, "min_tokens", self.min_tokens,
                   f"<= max_tokens ({self.max_tokens})")

        bias = self.logit_bias
        _check(bias is None or isinstance(bias, dict) and all(
            _is_token_id(k) and _is_number(v) and -100.0 <= v <= 100.0 for k, v in bias.items()),
            "logit_bias", bias, _LOGIT_BIAS)
        allowed = self.allowed_token_ids
        _check(allowed is None or _is_token_id_list(allowed), "allowed_token_ids", allowed, _TOKEN_ID_LIST)
        _check(allowed is None or allowed, "allowed_token_ids", allowed, "non-empty when given")
        _check(self.bad_words is None or isinstance(self.bad_words, list)
               and all(isinstance(w, str) and w.strip() for w in self.bad_words),
               "bad_words", self.bad_words, "a list of non-blank strings")
        _check(self.bad_words_token_ids is None or isinstance(self.bad_words_token_ids, list)
               and all(_is_token_id_list(ids) and ids for ids in self.bad_words_token_ids),
               "bad_words_token_ids", self.bad_words_token_ids, "a list of non-empty lists of " + _TOKEN_IDS)
        drafts = self.draft_token_ids
        _check(drafts is None or _is_token_id_list(drafts) and drafts, "draft_token_ids", drafts,
               "a non-empty list of " + _TOKEN_IDS)
        _check(isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop),
               "stop", self.stop, "a non-empty string or a list of non-empty strings")
        _check(_is_token_id_list(self.stop_token_ids), "stop_token_ids", self.stop_token_ids, _TOKEN_ID_LIST)
        _check(self.eos_token_id is None or _is_token_id(self.eos_token_id), "eos_token_id", self.eos_token_id,
               _EOS_TOKEN_ID)
        _check(self.logits_processors is None or isinstance(self.logits_processors, list)
               and all(isinstance(p, str) and ("." in p or ":" in p) and p.strip() == p and p
                       for p in self.logits_processors),
               "logits_processors", self.logits_processors,
               "a list of import paths 'pkg.module:callable' or 'pkg.module.callable'")
        _check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
               "structured_outputs", self.structured_outputs, "a StructuredOutputsParams")
        _check(self.compiled_grammar is None or isinstance(self.compiled_grammar, str), "compiled_grammar",
               self.compiled_grammar, "a string or None")
        _check(drafts is None or self.structured_outputs is None, "draft_token_ids", drafts,
               "None with structured_outputs (the grammar is matched token by token)")
        if self.use_beam_search:
            _check(self.structured_outputs is None, "use_beam_search", True,
                   "False with structured_outputs (beams are not constrained)")
            _check(drafts is None, "draft_token_ids", drafts, "None with use_beam_search (beams are scored "
                   "token by token; no draft can be verified for them)")
            _check(self.top_p == 1.0 and self.top_k == 0 and self.min_p == 0.0, "use_beam_search", True,
                   f"False with top_p, top_k or min_p set (top_p={self.top_p}, top_k={self.top_k}, min_p={self.min_p})")
        if not isinstance(self.output_kind, RequestOutputKind):
            _check(any(self.output_kind == k for k in RequestOutputKind), "output_kind", self.output_kind,
                   f"one of {[k.name for k in RequestOutputKind]}")
            self.output_kind = RequestOutputKind(self.output_kind)


def _tokenize_bad_words(tokenizer: Any, bad_words: list[str]) -> list[list[int]]:
    """Token ids of each bad word, with and without a leading space (as vLLM does), so the word is
    banned both at the start of the text and in the middle of it."""
    out: list[list[int]] = []
    for word in bad_words:
        plain = list(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        spaced = list(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        if plain:
            out.append(plain)
        # keep the spaced variant only when the space makes a new word token of the same length
        if spaced and (not plain or (spaced[0] != plain[0] and len(spaced) == len(plain))):
            out.append(spaced)
    return out


_processors: dict[str, Callable] = {}


def resolve_logits_processor(path: str) -> Callable:
    """'pkg.module:callable' or 'pkg.module.callable' -> the callable (imported once per path).
    The frontend resolves every entry before a request leaves it, so a bad one fails there."""
    fn = _processors.get(path)
    if fn is None:
        module, _, name = path.partition(":") if ":" in path else path.rpartition(".")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as e:
            raise ValueError(f"logits_processors entry {path!r} cannot be imported: {e}") from e
        if not callable(fn):
            raise ValueError(f"logits_processors entry {path!r} is not callable")
        _processors[path] = fn
    return fn
