class EngineDeadError(RuntimeError):
    """The engine core or a worker died; every pending and later request fails with this.
    The message carries the root cause (the child's exception or its exit status)."""

    @property
    def summary(self) -> str:
        """The message without the traceback it may carry: its first line and the exception
        that ended it. What a server's clients are told; its log keeps the whole message."""
        lines = [line for line in str(self).splitlines() if line.strip()]
        if len(lines) <= 1:
            return lines[0] if lines else ""
        return f"{lines[0].rstrip(':')}: {lines[-1].strip()}"


class EngineStartupError(RuntimeError):
    """The engine could not start: bad model path, bad config, a worker that failed to load."""
