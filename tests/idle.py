"""Waiting for an engine to go idle, as the tests of aborts and cancellation need."""

import asyncio
import time


async def wait_idle(llm, timeout: float = 5.0) -> dict:
    """The engine's stats once nothing runs, waits or holds a KV block, or at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        stats = await llm.get_stats()
        idle = stats["num_running"] == 0 and stats["num_waiting"] == 0 and stats["kv_cache_usage"] == 0
        if idle or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.05)
