from conveyor.ipc.process import summarize_failure


class EngineError(RuntimeError):
    """The engine failed; the message carries the root cause, a child's traceback included."""

    @property
    def summary(self) -> str:
        """The message without the traceback it may carry: its first line and the exception
        that ended it. What a server's clients and the command line are told; the log keeps the
        whole message."""
        return summarize_failure(str(self))


class EngineDeadError(EngineError):
    """The engine core or a worker died; every pending and later request fails with this.
    The message carries the root cause (the child's exception or its exit status)."""


class EngineStartupError(EngineError):
    """The engine could not start: bad model path, bad config, a worker that failed to load."""
