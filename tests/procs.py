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


def conveyor_processes(pids: list[int]) -> list[int]:
    """Those of `pids` running Conveyor's code (an engine core, a worker, an API server), not a
    library's passing helper such as the `ldconfig -p` that importing huggingface_hub may run."""
    def is_conveyor(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return b"conveyor" in f.read()
        except OSError:  # ended meanwhile
            return False

    return [pid for pid in pids if is_conveyor(pid)]


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
    """The engines' private directories in which any of `pids` holds something: a shared-memory ring
    it maps (even an unlinked one), a file it has open, an ipc:// socket it binds. An engine's own,
    unlike `engine_ipc_dirs`, which other engines on the machine change too."""
    paths, inodes = [], set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                paths += [line.split(maxsplit=5)[-1].strip() for line in f if "/conveyor-" in line]
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
                else:
                    paths.append(target)
        except OSError:
            continue  # gone meanwhile
    with open("/proc/net/unix") as f:
        paths += [fields[7] for fields in map(str.split, f) if len(fields) == 8 and fields[6] in inodes]
    prefix = os.path.join(ipc_root(), "conveyor-")
    return {path[:path.index("/", len(prefix))] for path in paths if path.startswith(prefix) and
            "/" in path[len(prefix):]}
