"""Grammars of structured outputs, compiled for the model's tokenizer off the event loop.

xgrammar compiles a JSON schema, regex, choice list or EBNF grammar into a token-level automaton
with a precomputed mask cache; this takes from microseconds to seconds, so it runs on a thread of
its own, once per (kind, spec): a request waits for its grammar before it leaves the frontend,
and no other request waits with it. The compiled grammar travels with the request, serialized, and
every worker rank matches it against the tokens it samples (`gpu_worker/structured_output.py`).
"""

import asyncio
import json
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from conveyor.sampling_params import StructuredOutputsParams

CACHE_SIZE = 256  # compiled grammars kept, least recently used dropped first
MAX_ERROR_CHARS = 500  # of the compiler's message, in the error a request gets


def choice_grammar(choices: list[str]) -> str:
    """EBNF accepting exactly one of `choices`."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class GrammarCompiler:
    """Compiles each constraint once (kept LRU) on a thread, for one tokenizer."""

    def __init__(self):
        self.tokenizer = None
        self.vocab_size = 0
        self._compiler = None
        self.tokenizer_json: str | None = None  # the workers need it to load what this compiles
        self._cache: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="conveyor-grammar")

    def bind(self, tokenizer, vocab_size: int) -> None:
        """The tokenizer to compile for, and the model's vocabulary size (its logits' width)."""
        self.tokenizer, self.vocab_size = tokenizer, vocab_size

    async def compile(self, constraint: StructuredOutputsParams) -> str:
        """The serialized compiled grammar; ValueError naming the field for one that cannot compile."""
        key = constraint.key()
        future = self._cache.get(key)
        if future is None:
            future = self._cache[key] = self._executor.submit(self._compile, constraint, key)
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return future.result() if future.done() else await asyncio.wrap_future(future)

    def compile_now(self, constraint: StructuredOutputsParams) -> str:
        return self._compile(constraint, constraint.key())

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _compile(self, constraint: StructuredOutputsParams, key: tuple[str, str]) -> str:
        import xgrammar

        if self._compiler is None:
            info = xgrammar.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size)
            self.tokenizer_json = info.serialize_json()
            self._compiler = xgrammar.GrammarCompiler(info, max_threads=1)
        kind, spec = key
        try:
            if kind == "json":
                compiled = self._compiler.compile_json_schema(spec, any_whitespace=False)
            elif kind == "json_object":
                compiled = self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=False,
                                                              strict_mode=False)
            elif kind == "regex":
                compiled = self._compiler.compile_regex(spec)
            elif kind == "choice":
                compiled = self._compiler.compile_grammar(choice_grammar(constraint.choice))
            else:
                compiled = self._compiler.compile_grammar(spec)
        except Exception as e:  # xgrammar raises RuntimeError, ValueError or its own errors
            message = " ".join(str(e).split())[:MAX_ERROR_CHARS] or type(e).__name__
            raise ValueError(f"structured_outputs.{kind} cannot be compiled: {message}") from None
        return compiled.serialize_json()
