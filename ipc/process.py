"""Child processes: how they start, how they learn their config, and how they die with their parent.

A child runs `python -m <module>`: it never re-imports the user's `__main__` (so scripts without an
`if __name__ == "__main__"` guard and notebooks work). Its config arrives msgpack-encoded on
stdin, and stdin then stays open as its lifeline: when the parent dies, SIGKILL included, the
pipe closes and the child removes the ipc directories it made (and whatever its own cleanup
says), then exits at once.
"""

import gc
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import msgspec

from conveyor.ipc.sockets import remove_own_ipc_dirs

_HEADER = 8


def spawn(module: str, payload: msgspec.Struct, name: str, new_process_group: bool = False,
          env: dict[str, str] | None = None, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    """Start `python -m module` and hand it `payload`. With `new_process_group` the child leads a
    group of its own, and everything it starts can be killed together. `pass_fds` stay open in it."""
    data = msgspec.msgpack.encode(payload)
    proc = subprocess.Popen(
        [sys.executable, "-m", module],
        stdin=subprocess.PIPE,
        start_new_session=new_process_group,
        pass_fds=pass_fds,
        env={**os.environ, **(env or {}), "CONVEYOR_PROCESS_NAME": name},
    )
    proc.stdin.write(len(data).to_bytes(_HEADER, "little") + data)
    proc.stdin.flush()
    return proc


def read_payload(type_: type, on_parent_death: Callable[[object], None] | None = None) -> object:
    """In a child: read the parent's payload, then watch the lifeline in a daemon thread; when it
    closes, run `on_parent_death(payload)` (cleanup the parent can no longer do) and exit."""
    stdin = sys.stdin.buffer
    size = int.from_bytes(_read_exactly(stdin, _HEADER), "little")
    payload = msgspec.msgpack.decode(_read_exactly(stdin, size), type=type_)
    cleanup = (lambda: on_parent_death(payload)) if on_parent_death else None
    threading.Thread(target=_exit_when_parent_dies, args=(stdin, cleanup), daemon=True, name="lifeline").start()
    return payload


def _read_exactly(stream, n: int) -> bytes:
    data = stream.read(n)
    if data is None or len(data) != n:
        os._exit(1)  # the parent went away before it finished talking to us
    return data


def _exit_when_parent_dies(stdin, cleanup: Callable[[], None] | None) -> None:
    while stdin.read(65536):
        pass
    for step in (cleanup, remove_own_ipc_dirs):
        try:
            if step is not None:
                step()
        except Exception:
            pass
    os._exit(1)


def kill_process_group(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """SIGKILL the group `proc` leads (it and every descendant that stayed in it), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return
    deadline = time.monotonic() + timeout
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.01)  # descendants, reparented when the leader died, still being reaped


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def terminate(proc: subprocess.Popen, timeout: float) -> None:
    """Ask politely (close the lifeline), wait, then kill."""
    try:
        if proc.stdin and not proc.stdin.closed:
            proc.stdin.close()
    except OSError:
        pass
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def is_stopped(pid: int) -> bool:
    """Whether the process is stopped (SIGSTOP, a debugger); False where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def describe_exit(name: str, returncode: int | None) -> str:
    if returncode is None:
        return f"{name} is still running"
    if returncode < 0:
        try:
            signame = signal.Signals(-returncode).name
        except ValueError:
            signame = f"signal {-returncode}"
        return f"{name} process died with {signame} (exit code {returncode})"
    return f"{name} process exited with code {returncode}"


def summarize_failure(text: str) -> str:
    """A failure's message in one line: its first line, and when more follow (a traceback it
    carries), the last one, which names the exception that ended it."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    return f"{lines[0].rstrip(':')}: {lines[-1]}"


def freeze_startup_objects() -> None:
    """Collect once, then move every object alive now (the model, the block pool, torch's and
    transformers' modules) out of the garbage collector's sight: they live as long as the process,
    and full collections over them would stall it for 100+ ms."""
    gc.collect()
    gc.freeze()


def run_child(main: Callable[[], None]) -> None:
    """Run a child's main: SIGINT is the parent's business (Ctrl-C reaches the whole terminal
    group), SIGTERM exits cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    main()
