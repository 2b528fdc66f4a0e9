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


def ipc_dirs_held_by(pids: list[int]) -> set[str]:
    """The engines' private directories in which any of `pids` holds a socket, a file or a mapping."""
    prefix = os.path.join(ipc_root(), "conveyor-")
    bound = {}  # unix socket inode -> its path
    with open("/proc/net/unix") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if len(fields) >= 8 and fields[7].startswith(prefix):
                bound[fields[6]] = fields[7]
    paths = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                paths.add(bound.get(link[len("socket:["):-1], "") if link.startswith("socket:[") else link)
            with open(f"/proc/{pid}/maps") as f:
                paths.update(line.split(maxsplit=5)[-1].strip() for line in f)
        except OSError:
            pass  # gone meanwhile
    return {os.path.join(ipc_root(), path[len(ipc_root()) + 1:].split(os.sep)[0])
            for path in paths if path.startswith(prefix)}
