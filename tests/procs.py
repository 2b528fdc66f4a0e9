"""Process-tree inspection for lifecycle tests (reads /proc; no psutil needed)."""

import glob
import os
import time

from conveyor.ipc.process import group_alive  # noqa: F401  (re-exported for the tests)
from conveyor.ipc.sockets import ipc_root


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return found


def descendants_of(pid: int) -> list[int]:
    result, frontier = [], [pid]
    while frontier:
        kids = children_of(frontier.pop())
        result += kids
        frontier += kids
    return result


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def engine_pids(llm) -> tuple[int, list[int]]:
    """(core pid, worker pids) of an AsyncLLM."""
    core = llm.client.proc.pid
    return core, children_of(core)


def engine_ipc_dirs() -> set[str]:
    """The engines' private directories that exist now (not the benchmark tools' temp dirs)."""
    return {path for path in glob.glob(os.path.join(ipc_root(), "conveyor-*"))
            if not os.path.basename(path).startswith("conveyor-bench-")}


def ipc_dirs_of(pids: list[int]) -> set[str]:
    """The engines' private directories whose files (shared-memory rings, even unlinked ones) these
    processes have mapped: an engine's own, unlike `engine_ipc_dirs`, which other engines on the
    machine change too."""
    root, found = ipc_root(), set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                paths = [line.split(maxsplit=5)[-1].strip() for line in f if "/conveyor-" in line]
        except OSError:
            continue
        for path in paths:
            if path.startswith(root + "/conveyor-"):
                found.add(os.path.join(root, path[len(root) + 1:].split("/")[0]))
    return found
