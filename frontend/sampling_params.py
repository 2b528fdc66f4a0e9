"""Per-request sampling parameters (vLLM names and defaults).

`SamplingParams` crosses process boundaries msgpack-encoded; msgspec calls `__post_init__` again
on decode, so validation is plain comparisons and normalisation is idempotent.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

import msgspec

MAX_LOGPROBS = 20
GREEDY_TEMPERATURE = 1e-5  # temperatures below this sample greedily (as vLLM)
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1


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


def _check_int_list(name: str, value: Any) -> None:
    if not isinstance(value, list) or not all(_is_int(t) for t in value):
        raise ValueError(f"{name} must be a list of ints, got {value!r}")
    if any(t < 0 for t in value):
        raise ValueError(f"{name} must hold token ids >= 0, got {value!r}")


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
    max_tokens: int | None = 16
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
        self._derive_stop_ids()
        return self

    # -- internals -------------------------------------------------------------------------------

    def _derive_stop_ids(self) -> None:
        ids = list(self.stop_token_ids)
        if not self.ignore_eos and self.eos_token_id is not None and self.eos_token_id not in ids:
            ids.append(self.eos_token_id)
        self.all_stop_token_ids = ids

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

        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if not 0.0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be in [0, inf), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be -1 (disabled), 0 (disabled) or >= 1, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None and not (_is_int(self.seed) and _SEED_MIN <= self.seed <= _SEED_MAX):
            raise ValueError(f"seed must be an int in [-2**63, 2**64 - 1] or None, got {self.seed!r}")
        if not 0.0 < self.repetition_penalty < float("inf"):
            raise ValueError(f"repetition_penalty must be in (0, inf), got {self.repetition_penalty}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(
                f"no_repeat_ngram_size must be >= 0 (0 = disabled), got {self.no_repeat_ngram_size}")

        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or not all(
                    _is_int(k) and k >= 0 and _is_number(v) and -100.0 <= v <= 100.0
                    for k, v in self.logit_bias.items()):
                raise ValueError(
                    "logit_bias must map token ids >= 0 to biases in [-100, 100], "
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
                or not all(isinstance(ids, list) and ids and all(_is_int(t) and t >= 0 for t in ids)
                           for ids in self.bad_words_token_ids)):
            raise ValueError(
                "bad_words_token_ids must be a list of non-empty token id lists, "
                f"got {self.bad_words_token_ids!r}")

        if self.max_tokens is not None and not (_is_int(self.max_tokens) and self.max_tokens >= 1):
            raise ValueError(f"max_tokens must be an int >= 1 or None, got {self.max_tokens!r}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")

        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        if any(s == "" for s in self.stop):
            raise ValueError(f"stop must not contain empty strings, got {self.stop!r}")
        _check_int_list("stop_token_ids", self.stop_token_ids)
        if self.eos_token_id is not None and not (_is_int(self.eos_token_id) and self.eos_token_id >= 0):
            raise ValueError(f"eos_token_id must be an int >= 0 or None, got {self.eos_token_id!r}")

        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an int in [0, {MAX_LOGPROBS}] or None, got {value!r}")
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
