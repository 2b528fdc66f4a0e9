import msgspec
import pytest

from conveyor.config import RequestLimits
from conveyor.sampling_params import RequestOutputKind, SamplingParams, child_seed, resolve_max_tokens

INVALID = [
    ("n", 0), ("n", 1.5),
    ("temperature", -0.1), ("temperature", float("inf")), ("temperature", "hot"),
    ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("top_k", 2.5),
    ("min_p", -0.1), ("min_p", 1.1),
    ("seed", 2**64), ("seed", "7"),
    ("repetition_penalty", 0.0), ("repetition_penalty", float("nan")),
    ("presence_penalty", 2.5), ("presence_penalty", -2.1),
    ("frequency_penalty", 3.0), ("frequency_penalty", -2.5),
    ("no_repeat_ngram_size", -1),
    ("logit_bias", {-1: 1.0}), ("logit_bias", {5: 101.0}), ("logit_bias", [1, 2]),
    ("allowed_token_ids", []), ("allowed_token_ids", [1, -3]), ("allowed_token_ids", ["a"]),
    ("bad_words", [""]), ("bad_words", ["ok", 3]), ("bad_words", "word"),
    ("max_tokens", 0), ("max_tokens", 2.0),
    ("min_tokens", -1),
    ("ignore_eos", 1), ("include_stop_str_in_output", "yes"), ("skip_special_tokens", None),
    ("spaces_between_special_tokens", 0), ("detokenize", "no"), ("use_beam_search", 1),
    ("early_stopping", "never"),
    ("stop", [""]), ("stop", ["ok", 1]), ("stop", 5),
    ("stop_token_ids", [-1]), ("stop_token_ids", [1.0]),
    ("logprobs", -1), ("prompt_logprobs", -1),
    ("output_kind", 7),
    ("length_penalty", "long"),
    ("logits_processors", ["noimportpath"]), ("logits_processors", "pkg.mod:fn"),
    ("bad_words_token_ids", [[]]),
    ("eos_token_id", -1),
    # beyond what the later stages hold: int32 tensors, float32 tensors, int64 seeds, msgpack
    ("n", 2**31), ("top_k", 2**31), ("top_k", 2**64), ("no_repeat_ngram_size", 2**31),
    ("no_repeat_ngram_size", 2**70), ("max_tokens", 2**31), ("min_tokens", 2**31),
    ("logprobs", 2**31), ("prompt_logprobs", 2**64),
    ("seed", 2**63), ("seed", 2**64 - 1), ("seed", -(2**63) - 1),
    ("logit_bias", {2**31: 1.0}), ("logit_bias", {2**64: 1.0}), ("logit_bias", {5: float("nan")}),
    ("allowed_token_ids", [2**31]), ("allowed_token_ids", [2**70]), ("stop_token_ids", [2**64]),
    ("bad_words_token_ids", [[2**64]]), ("eos_token_id", 2**31),
    ("temperature", 1e39), ("temperature", float("nan")), ("top_p", float("nan")), ("min_p", float("nan")),
    ("repetition_penalty", float("inf")), ("repetition_penalty", 1e39), ("repetition_penalty", 1e-300),
    ("presence_penalty", float("nan")), ("length_penalty", float("inf")), ("length_penalty", 11.0),
]


@pytest.mark.parametrize("name,value", INVALID, ids=[f"{n}={v!r}" for n, v in INVALID])
def test_invalid_field_raises_value_error_naming_field_and_value(name, value):
    with pytest.raises(ValueError) as info:
        SamplingParams(**{name: value})
    message = str(info.value)
    assert message.startswith(name), message
    assert repr(value) in message or str(value) in message, message


def test_error_message_states_allowed_range():
    with pytest.raises(ValueError, match=r"^top_p must be in \(0, 1\], got 1.5$"):
        SamplingParams(top_p=1.5)


def test_min_tokens_above_max_tokens_is_rejected():
    with pytest.raises(ValueError, match="min_tokens must be <= max_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)


def test_beam_search_rejects_sampling_filters():
    with pytest.raises(ValueError, match="use_beam_search"):
        SamplingParams(use_beam_search=True, n=4, top_p=0.5)


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens, p.min_tokens) == (
        1, 1.0, 1.0, 0, 0.0, 16, 0)
    assert p.stop == [] and p.stop_token_ids == [] and p.output_kind is RequestOutputKind.CUMULATIVE
    assert p.skip_special_tokens and p.spaces_between_special_tokens and p.detokenize


def test_top_k_minus_one_normalises_to_zero():
    assert SamplingParams(top_k=-1).top_k == 0


def test_stop_string_normalises_to_list():
    assert SamplingParams(stop="###").stop == ["###"]


def test_max_tokens_none_means_unbounded():
    assert SamplingParams(max_tokens=None, min_tokens=1000).max_tokens is None


def test_msgpack_round_trip_preserves_every_field():
    p = SamplingParams(
        n=2, temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, seed=1234, repetition_penalty=1.2,
        presence_penalty=0.5, frequency_penalty=-0.5, no_repeat_ngram_size=3,
        logit_bias={5: -3.0, 9: 2.5}, allowed_token_ids=[1, 2, 3], bad_words=["foo bar"],
        max_tokens=None, min_tokens=2, stop=["\n\n", "END"], stop_token_ids=[7],
        include_stop_str_in_output=True, logprobs=5, prompt_logprobs=0, skip_special_tokens=False,
        spaces_between_special_tokens=False, output_kind=RequestOutputKind.DELTA,
        logits_processors=["pkg.mod:fn"], bad_words_token_ids=[[3, 4]], eos_token_id=2)
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(p), type=SamplingParams)
    assert decoded == p
    assert decoded.output_kind is RequestOutputKind.DELTA
    assert decoded.all_stop_token_ids == [7, 2]


def test_default_params_encode_to_an_empty_map():
    assert msgspec.msgpack.encode(SamplingParams()) == b"\xde\x00\x00"


def test_decoding_invalid_payload_raises():
    payload = msgspec.msgpack.encode({"top_p": 2.0})
    with pytest.raises(msgspec.ValidationError, match="top_p"):
        msgspec.msgpack.decode(payload, type=SamplingParams)


def test_greedy_follows_temperature_and_beam_search():
    assert SamplingParams(temperature=0).greedy
    assert not SamplingParams().greedy
    assert SamplingParams(use_beam_search=True, n=3).greedy


def test_all_stop_token_ids_add_eos_unless_ignore_eos():
    assert SamplingParams(stop_token_ids=[5], eos_token_id=2).all_stop_token_ids == [5, 2]
    assert SamplingParams(stop_token_ids=[5], eos_token_id=2, ignore_eos=True).all_stop_token_ids == [5]


class _WordTokenizer:
    """Splits on spaces; a word with a leading space is a different token than without."""

    def __init__(self):
        self.vocab = {w: i for i, w in enumerate(
            ["<eos>", "foo", " foo", "bar", " bar", "baz", "x", " "])}

    def __len__(self):
        return len(self.vocab)

    def encode(self, text, add_special_tokens=False):
        words = text.split(" ")
        out = [self.vocab[words[0]]] if words[0] else []
        for w in words[1:]:
            out += [self.vocab[" " + w]] if " " + w in self.vocab else [self.vocab[" "], self.vocab[w]]
        return out


def test_bind_tokenizer_tokenizes_bad_words_with_and_without_leading_space():
    p = SamplingParams(bad_words=["foo bar", "baz"]).bind_tokenizer(_WordTokenizer(), eos_token_id=0)
    # "baz" has no spaced variant of its own: " baz" is not a new word token
    assert p.bad_words_token_ids == [[1, 4], [2, 4], [5]]


def test_bind_tokenizer_sets_eos_and_stop_ids():
    p = SamplingParams(stop_token_ids=[6]).bind_tokenizer(_WordTokenizer(), eos_token_id=[0, 5])
    assert p.eos_token_id == 0
    assert p.stop_token_ids == [6, 5]
    assert p.all_stop_token_ids == [6, 5, 0]


@pytest.mark.parametrize("name,value", [("stop_token_ids", [99]), ("allowed_token_ids", [1, 8]),
                                        ("logit_bias", {12: 1.0})])
def test_bind_tokenizer_rejects_token_ids_outside_vocab(name, value):
    with pytest.raises(ValueError, match=rf"^{name} holds token ids outside the vocabulary \[0, 8\)"):
        SamplingParams(**{name: value}).bind_tokenizer(_WordTokenizer(), eos_token_id=0)


def test_bind_tokenizer_accepts_larger_model_vocab():
    p = SamplingParams(allowed_token_ids=[10]).bind_tokenizer(_WordTokenizer(), 0, vocab_size=16)
    assert p.allowed_token_ids == [10]


@pytest.mark.parametrize("name", ["logprobs", "prompt_logprobs"])
def test_bind_tokenizer_rejects_more_logprobs_than_the_vocab_holds(name):
    with pytest.raises(ValueError, match=rf"^{name} must be in \[0, 8\] \(the vocabulary size\), got 9$"):
        SamplingParams(**{name: 9}).bind_tokenizer(_WordTokenizer(), eos_token_id=0)


def test_min_tokens_with_only_stop_tokens_allowed_is_rejected():
    with pytest.raises(ValueError, match=r"^min_tokens must be 0 when allowed_token_ids holds only stop tokens"):
        SamplingParams(min_tokens=2, allowed_token_ids=[0]).bind_tokenizer(_WordTokenizer(), eos_token_id=0)
    with pytest.raises(ValueError, match=r"^min_tokens must be 0"):
        SamplingParams(min_tokens=1, allowed_token_ids=[5, 6], stop_token_ids=[5, 6])
    assert SamplingParams(min_tokens=2, allowed_token_ids=[0, 1]).bind_tokenizer(_WordTokenizer(), 0)
    assert SamplingParams(min_tokens=2, allowed_token_ids=[0], ignore_eos=True).bind_tokenizer(_WordTokenizer(), 0)


def test_top_p_below_float32_range_keeps_only_the_top_token():
    assert SamplingParams(top_p=1e-300).top_p == pytest.approx(1.1754943508222875e-38)
    assert SamplingParams(top_p=0.5).top_p == 0.5


@pytest.mark.parametrize("name,value,message", [
    ("n", 129, r"^n must be at most 128 \(request limit max_n\), got 129$"),
    ("logprobs", 21, r"^logprobs must be at most 20 \(request limit max_logprobs\), got 21$"),
    ("prompt_logprobs", 21, r"^prompt_logprobs must be at most 20 \(request limit max_logprobs\)"),
    ("stop", [f"s{i}" for i in range(65)], r"^stop must hold at most 64 strings \(request limit max_stop\), got 65$"),
    ("logit_bias", {i: 1.0 for i in range(1025)}, r"^logit_bias must hold at most 1024 entries"),
    ("bad_words", [f"w{i}" for i in range(257)], r"^bad_words must hold at most 256 words"),
])
def test_request_beyond_the_default_limits_is_refused_naming_the_field_and_limit(name, value, message):
    SamplingParams(**{name: value})  # valid on its own: only the engine's limits refuse it
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{name: value}).check_limits(RequestLimits())


def test_request_limits_are_configurable():
    SamplingParams(n=500).check_limits(RequestLimits(max_n=500))
    with pytest.raises(ValueError, match=r"^n must be at most 4 "):
        SamplingParams(n=5).check_limits(RequestLimits(max_n=4))
    with pytest.raises(ValueError, match=r"^max_n must be in \[1, 2147483647\], got 0$"):
        RequestLimits(max_n=0)


def test_child_seeds_of_n_samples_stay_within_int64():
    assert [child_seed(7, i) for i in range(3)] == [7, 8, 9]
    assert child_seed(2**63 - 1, 1) == -(2**63)
    assert child_seed(None, 3) is None


def test_max_tokens_none_resolves_to_what_max_model_len_leaves_after_the_prompt():
    assert resolve_max_tokens(10, None, 64) == 54
    assert resolve_max_tokens(10, 54, 64) == 54


@pytest.mark.parametrize("num_prompt_tokens", [0, 64, 100])
def test_prompt_that_is_empty_or_leaves_no_output_token_is_refused(num_prompt_tokens):
    with pytest.raises(ValueError, match=rf"^prompt must be 1 to 63 tokens long \(max_model_len 64 less one "
                                         rf"output token\), got {num_prompt_tokens} tokens$"):
        resolve_max_tokens(num_prompt_tokens, None, 64)


def test_max_tokens_beyond_what_max_model_len_leaves_is_refused():
    with pytest.raises(ValueError, match=r"^max_tokens must be in \[1, 54\] \(max_model_len 64 less the prompt's "
                                         r"10 tokens\), got 55$"):
        resolve_max_tokens(10, 55, 64)
