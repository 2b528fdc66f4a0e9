"""How random sampling is keyed. Every request has a 64-bit seed: its `SamplingParams.seed`, or,
when it has none, one the engine core derives from the engine's `seed` and the request's arrival
number. The random numbers a request draws for its output token at position p come from a
generator seeded with `derive_seed(request seed, p)`: a pure function of the two, the same on
every tensor-parallel rank whatever the batch, preemptions, chunking or async scheduling.
"""

_MASK64 = (1 << 64) - 1


def derive_seed(seed: int, index: int) -> int:
    """The seed of stream `index` under `seed` (any int; the result is in [0, 2**64))."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (index & _MASK64))


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)
