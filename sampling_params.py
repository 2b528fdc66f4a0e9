"""Per-request sampling parameters (vLLM names and defaults).

`SamplingParams` crosses process boundaries msgpack-encoded; msgspec calls `__post_init__` again
on decode, so validation is plain comparisons and normalisation is idempotent.
"""

from __future__ import annotations

import enum
import importlib
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from conveyor.config import RequestLimits

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


class SamplingType(enum.IntEnum):
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2
    BEAM = 3


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_token_id(x: Any) -> bool:
    return _is_int(x) and 0 <= x <= INT32_MAX


def _check_int_list(name: str, value: Any) -> None:
    if not isinstance(value, list) or not all(_is_int(t) for t in value):
        raise ValueError(f"{name} must be a list of ints, got {value!r}")
    if not all(_is_token_id(t) for t in value):
        raise ValueError(f"{name} must hold token ids in [0, {INT32_MAX}], got {value!r}")


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if not (_is_int(value) and low <= value <= high):
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")


def _check_float(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:  # False for nan
        raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {value!r}")


def resolve_max_tokens(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> int:
    """How many tokens a request may generate: `max_tokens`, or where None all that max_model_len
    leaves after the prompt. The frontend and the engine core both refuse a request by this rule."""
    room = max_model_len - num_prompt_tokens
    if num_prompt_tokens < 1 or room < 1:
        raise ValueError(f"prompt must be 1 to {max_model_len - 1} tokens long (max_model_len {max_model_len} "
                         f"less one output token), got {num_prompt_tokens} tokens")
    if max_tokens is None:
        return room
    if not 1 <= max_tokens <= room:
        raise ValueError(f"max_tokens must be in [1, {room}] (max_model_len {max_model_len} less the prompt's "
                         f"{num_prompt_tokens} tokens), got {max_tokens}")
    return max_tokens


def child_seed(seed: int | None, index: int) -> int | None:
    """The seed of sample `index` of an n > 1 request: seed + index, wrapped into int64."""
    if seed is None:
        return None
    return (seed + index - INT64_MIN) % 2**64 + INT64_MIN


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

    # Internal, filled by the frontend (`bind_tokenizer`).
    bad_words_token_ids: list[list[int]] | None = None
    eos_token_id: int | None = None
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

    @property
    def sampling_type(self) -> SamplingType:
        if self.use_beam_search:
            return SamplingType.BEAM
        if self.temperature < GREEDY_TEMPERATURE:
            return SamplingType.GREEDY
        return SamplingType.RANDOM if self.seed is None else SamplingType.RANDOM_SEED

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
                  ("bad_words", len(self.bad_words or ()), "max_bad_words", " words")]
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
        if allowed is not None and self.min_tokens and set(allowed) <= set(ids):
            raise ValueError(
                f"min_tokens must be 0 when allowed_token_ids holds only stop tokens ({allowed}): "
                f"no other token could be sampled, got {self.min_tokens}")

    def _validate(self) -> None:
        for name in ("n", "top_k", "no_repeat_ngram_size", "min_tokens"):
            value = getattr(self, name)
            if not _is_int(value):
                raise ValueError(f"{name} must be an int, got {value!r}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty", "length_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or value != value:
                raise ValueError(f"{name} must be a number, got {value!r}")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens",
                     "spaces_between_special_tokens", "detokenize", "use_beam_search",
                     "early_stopping"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool, got {value!r}")

        _check_int("n", self.n, 1, INT32_MAX)
        _check_float("temperature", self.temperature, 0.0, FLOAT32_MAX)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.top_k <= INT32_MAX:
            raise ValueError(
                f"top_k must be -1 (disabled), 0 (disabled) or in [1, {INT32_MAX}], got {self.top_k}")
        _check_float("min_p", self.min_p, 0.0, 1.0)
        if self.seed is not None:
            _check_int("seed", self.seed, INT64_MIN, INT64_MAX)
        _check_float("repetition_penalty", self.repetition_penalty, FLOAT32_TINY, FLOAT32_MAX)
        _check_float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        # beam search divides by generated_length ** length_penalty, with lengths up to 2**31
        _check_float("length_penalty", self.length_penalty, -10.0, 10.0)
        _check_int("no_repeat_ngram_size", self.no_repeat_ngram_size, 0, INT32_MAX)

        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or not all(
                    _is_token_id(k) and _is_number(v) and -100.0 <= v <= 100.0
                    for k, v in self.logit_bias.items()):
                raise ValueError(
                    f"logit_bias must map token ids in [0, {INT32_MAX}] to biases in [-100, 100], "
                    f"got {self.logit_bias!r}")
        if self.allowed_token_ids is not None:
            _check_int_list("allowed_token_ids", self.allowed_token_ids)
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids must be non-empty when given, got []")
        if self.bad_words is not None and (
                not isinstance(self.bad_words, list)
                or not all(isinstance(w, str) and w.strip() for w in self.bad_words)):
            raise ValueError(f"bad_words must be a list of non-blank strings, got {self.bad_words!r}")
        if self.bad_words_token_ids is not None and (
                not isinstance(self.bad_words_token_ids, list)
                or not all(isinstance(ids, list) and ids and all(_is_token_id(t) for t in ids)
                           for ids in self.bad_words_token_ids)):
            raise ValueError(
                f"bad_words_token_ids must be a list of non-empty lists of token ids in [0, {INT32_MAX}], "
                f"got {self.bad_words_token_ids!r}")

        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, 1, INT32_MAX)
        _check_int("min_tokens", self.min_tokens, 0, INT32_MAX)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")

        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        if any(s == "" for s in self.stop):
            raise ValueError(f"stop must not contain empty strings, got {self.stop!r}")
        _check_int_list("stop_token_ids", self.stop_token_ids)
        if self.eos_token_id is not None and not _is_token_id(self.eos_token_id):
            raise ValueError(
                f"eos_token_id must be a token id in [0, {INT32_MAX}] or None, got {self.eos_token_id!r}")

        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, 0, INT32_MAX)
        if not isinstance(self.output_kind, RequestOutputKind):
            try:
                self.output_kind = RequestOutputKind(self.output_kind)
            except ValueError:
                raise ValueError(
                    f"output_kind must be one of {[k.name for k in RequestOutputKind]}, "
                    f"got {self.output_kind!r}") from None

        if self.use_beam_search:
            if self.top_p != 1.0 or self.top_k != 0 or self.min_p != 0.0:
                raise ValueError(
                    "use_beam_search must not be combined with top_p, top_k or min_p, got "
                    f"top_p={self.top_p}, top_k={self.top_k}, min_p={self.min_p}")
        if self.logits_processors is not None and (
                not isinstance(self.logits_processors, list)
                or not all(isinstance(p, str) and ("." in p or ":" in p) and p.strip() == p and p
                           for p in self.logits_processors)):
            raise ValueError(
                "logits_processors must be a list of import paths 'pkg.module:callable' or "
                f"'pkg.module.callable', got {self.logits_processors!r}")
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
