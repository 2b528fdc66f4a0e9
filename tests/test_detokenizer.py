import pytest
from transformers import AutoTokenizer

from conveyor.frontend.detokenizer import IncrementalDetokenizer
from conveyor.sampling_params import SamplingParams

TEXT = "héllo wörld 你好 🙂 the end.<|im_end|>\n<|im_start|>more: ünïcödé ✓"


@pytest.fixture(scope="module")
def tokenizer(llama_dir):
    return AutoTokenizer.from_pretrained(llama_dir)


def ids_of(tokenizer, text=TEXT):
    return tokenizer.encode(text, add_special_tokens=False)


def feed(tokenizer, ids, **kw):
    detok = IncrementalDetokenizer(tokenizer, [1, 2, 3], SamplingParams(**kw))
    hit = None
    for t in ids:
        hit = detok.update([t]) or hit
    return detok, hit


class SlowTokenizer:
    """A tokenizer without a Rust backend: the detokenizer falls back to window decoding."""

    def __init__(self, fast):
        self.fast = fast
        self.decoded_lengths = []

    def decode(self, ids, **kw):
        self.decoded_lengths.append(len(ids))
        return self.fast.decode(ids, **kw)


@pytest.mark.parametrize("skip", [True, False], ids=["skip_special", "keep_special"])
def test_incremental_text_equals_full_decode_at_every_prefix(tokenizer, skip):
    ids = ids_of(tokenizer)
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(skip_special_tokens=skip))
    for n, t in enumerate(ids, 1):
        detok.update([t])
        full = tokenizer.decode(ids[:n], skip_special_tokens=skip)
        assert detok.output_text == full.rstrip("\ufffd"), n
    assert detok.output_text == tokenizer.decode(ids, skip_special_tokens=skip)


def test_window_fallback_equals_full_decode_at_every_prefix(tokenizer):
    ids = ids_of(tokenizer)
    detok = IncrementalDetokenizer(SlowTokenizer(tokenizer), [], SamplingParams())
    for n, t in enumerate(ids, 1):
        detok.update([t])
        assert detok.output_text == tokenizer.decode(ids[:n], skip_special_tokens=True).rstrip("\ufffd")


def test_window_fallback_decodes_a_bounded_window_per_step(tokenizer):
    slow = SlowTokenizer(tokenizer)
    ids = ids_of(tokenizer, TEXT * 8)
    detok = IncrementalDetokenizer(slow, [], SamplingParams())
    for t in ids:
        detok.update([t])
    assert len(ids) > 150 and max(slow.decoded_lengths) <= 8


def test_incomplete_utf8_character_is_held_back(tokenizer):
    ids = ids_of(tokenizer, "a🙂")
    assert len(ids) >= 3  # the emoji's four bytes span several tokens
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    deltas = []
    for t in ids:
        detok.update([t])
        deltas.append(detok.get_delta_text())
    assert deltas[0] == "a" and all(d == "" for d in deltas[1:-1]) and deltas[-1] == "🙂"


def test_delta_texts_concatenate_to_output_text(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    parts = []
    for t in ids_of(tokenizer):
        detok.update([t])
        parts.append(detok.get_delta_text())
    assert "".join(parts) == detok.output_text
    assert detok.get_delta_text() == ""


def test_multi_token_update_equals_token_by_token(tokenizer):
    ids = ids_of(tokenizer)
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    for i in range(0, len(ids), 5):
        detok.update(ids[i:i + 5])
    assert detok.output_text == tokenizer.decode(ids, skip_special_tokens=True)


def test_stop_string_spanning_tokens_truncates_before_it(tokenizer):
    ids = ids_of(tokenizer)
    stop = "ld 你"  # spans the tokens of "wörld" and "你"
    detok, hit = feed(tokenizer, ids, stop=[stop])
    assert hit == stop
    assert detok.output_text == "héllo wör"
    assert detok.finished


def test_stop_string_spanning_tokens_is_kept_with_include_stop_str_in_output(tokenizer):
    detok, hit = feed(tokenizer, ids_of(tokenizer), stop=["ld 你"], include_stop_str_in_output=True)
    assert hit == "ld 你"
    assert detok.output_text == "héllo wörld 你"


def test_earliest_of_several_stop_strings_wins(tokenizer):
    detok, hit = feed(tokenizer, ids_of(tokenizer, "one two three"), stop=["three", "two t"])
    assert hit == "two t" and detok.output_text == "one "


def test_tokens_after_a_stop_add_no_text(tokenizer):
    detok, _ = feed(tokenizer, ids_of(tokenizer, "ab STOP cd"), stop=["STOP"])
    assert detok.update(ids_of(tokenizer, " more")) is None
    assert detok.output_text == "ab "


def test_delta_holds_back_a_possible_stop_prefix_until_resolved(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["xyz"]))
    detok.update(ids_of(tokenizer, "abc"))
    assert detok.get_delta_text() == "a"  # "bc" waits: len("xyz") - 1 chars are held back
    detok.update(ids_of(tokenizer, " def"))
    assert detok.get_delta_text() == "bc d"
    assert detok.get_delta_text(finished=True) == "ef"


def test_held_back_text_is_dropped_when_the_stop_string_completes(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["END"]))
    streamed = ""
    for t in ids_of(tokenizer, "hello END world"):
        detok.update([t])
        streamed += detok.get_delta_text()
    streamed += detok.get_delta_text()
    assert streamed == detok.output_text == "hello "


def test_stop_strings_are_not_matched_before_min_tokens(tokenizer):
    ids = ids_of(tokenizer, "stop here and stop there")
    first = len(ids_of(tokenizer, "stop"))
    detok, hit = feed(tokenizer, ids, stop=["stop"], min_tokens=first + 1)
    assert hit == "stop" and detok.output_text == "stop here and "


def test_stop_terminated_token_adds_no_text(tokenizer):
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(skip_special_tokens=False))
    detok.update(ids_of(tokenizer, "hi"))
    detok.update([eos], stop_terminated=True)
    assert detok.output_text == "hi"


def test_stop_terminated_token_is_kept_with_include_stop_str_in_output(tokenizer):
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    params = SamplingParams(skip_special_tokens=False, include_stop_str_in_output=True)
    detok = IncrementalDetokenizer(tokenizer, [], params)
    detok.update(ids_of(tokenizer, "hi") + [eos], stop_terminated=True)
    assert detok.output_text == "hi<|im_end|>"


def test_detokenize_false_produces_no_text(tokenizer):
    detok, hit = feed(tokenizer, ids_of(tokenizer, "a b STOP"), detokenize=False, stop=["STOP"])
    assert hit is None and detok.output_text == "" and detok.get_delta_text() == ""
    assert detok.num_tokens == len(ids_of(tokenizer, "a b STOP"))
