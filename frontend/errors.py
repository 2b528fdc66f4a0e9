class EngineDeadError(RuntimeError):
    """The engine core or a worker died; every pending and later request fails with this.
    The message carries the root cause (the child's exception or its exit status)."""


class EngineStartupError(RuntimeError):
    """The engine could not start: bad model path, bad config, a worker that failed to load."""
