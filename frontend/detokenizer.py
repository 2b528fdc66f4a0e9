"""Incremental detokenization with stop-string detection, O(new tokens) per step.

At every step `output_text` equals `tokenizer.decode(output_ids, skip_special_tokens=...)` minus an
incomplete UTF-8 character at the end, which is held back until its last byte arrives. Fast
tokenizers decode through tokenizers' `DecodeStream` (one Rust call per token); others re-decode
a short window of tokens (the prefix/read-offset technique of HF's TextStreamer and vLLM).
The prompt is not used as decoding context, so the text is what decoding the output alone gives.
"""

from __future__ import annotations

import logging
from typing import Any

from conveyor.sampling_params import SamplingParams

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers < 0.21
    DecodeStream = None

logger = logging.getLogger(__name__)

_INVALID_PREFIX = "Invalid prefix encountered"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.num_tokens = 0  # output tokens seen, including any that added no text
        self.stop_str: str | None = None
        self._text = ""
        self._delta_offset = 0
        stops = params.stop
        self._max_stop_len = max((len(s) for s in stops), default=0)
        # while streaming, hold back text a later stop string could still cut off
        self._hold = 0 if params.include_stop_str_in_output else max(self._max_stop_len - 1, 0)

        self._stream = None
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        if (params.detokenize and self._backend is not None and DecodeStream is not None
                and not getattr(tokenizer, "clean_up_tokenization_spaces", False)):
            self._stream = DecodeStream(skip_special_tokens=params.skip_special_tokens)
        # window decoding state (tokenizers without a DecodeStream)
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    @property
    def output_text(self) -> str:
        return self._text

    @property
    def finished(self) -> bool:
        return self.stop_str is not None

    def update(self, new_token_ids: list[int], stop_terminated: bool = False) -> str | None:
        """Decode `new_token_ids`; return the stop string they completed, if any (the text is
        then truncated before it, or after it with include_stop_str_in_output).

        `stop_terminated`: the last token is an EOS / stop token id, whose text is left out
        unless include_stop_str_in_output."""
        self.num_tokens += len(new_token_ids)
        if not self.params.detokenize or self.stop_str is not None:
            return None
        ids = new_token_ids
        if stop_terminated and not self.params.include_stop_str_in_output:
            ids = ids[:-1]
        if self._stream is not None:
            chunks = [c for c in map(self._step, ids) if c]
        else:
            chunks = [self._step_window(t) for t in ids]
        new_text = "".join(chunks)
        if not new_text:
            return None
        self._text += new_text
        if self.params.stop and self.num_tokens >= self.params.min_tokens:
            self.stop_str = self._find_stop(len(new_text))
        return self.stop_str

    def get_delta_text(self, finished: bool = False) -> str:
        """Text added since the last call. While not finished, the last (max stop length - 1)
        characters wait, since a stop string completed later would remove them."""
        end = self._visible_end(finished)
        delta = self._text[self._delta_offset:end]
        self._delta_offset = max(end, self._delta_offset)
        return delta

    def get_output_text(self, finished: bool = False) -> str:
        """All text so far, holding back what a later stop string could still remove."""
        return self._text[:self._visible_end(finished)]

    # -- internals -------------------------------------------------------------------------------

    def _visible_end(self, finished: bool) -> int:
        if finished or self.stop_str is not None:
            return len(self._text)
        return max(len(self._text) - self._hold, 0)

    def _find_stop(self, new_chars: int) -> str | None:
        """Earliest stop string that ends in the new text; truncates `_text` at it."""
        text = self._text
        best: tuple[int, int, str] | None = None
        for s in self.params.stop:
            i = text.find(s, max(len(text) - new_chars - len(s) + 1, 0))
            if i != -1 and (best is None or (i, -len(s)) < best[:2]):
                best = (i, -len(s), s)
        if best is None:
            return None
        i, _, s = best
        self._text = text[:i + len(s)] if self.params.include_stop_str_in_output else text[:i]
        return s

    def _step(self, token_id: int) -> str | None:
        try:
            return self._stream.step(self._backend, token_id)
        except Exception as e:
            if not str(e).startswith(_INVALID_PREFIX):
                raise
            # the stream's buffered bytes became invalid UTF-8: restart it from this token
            logger.warning("detokenizer: %s; resetting the decode stream", e)
            self._stream = DecodeStream(skip_special_tokens=self.params.skip_special_tokens)
            return self._stream.step(self._backend, token_id)

    def _step_window(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""  # nothing new, or an incomplete UTF-8 character: wait for more tokens
        del self._ids[:self._read_offset]  # keep only the window: ids before it are done
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        return new_text[len(prefix_text):]

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.params.skip_special_tokens,
            spaces_between_special_tokens=self.params.spaces_between_special_tokens)
