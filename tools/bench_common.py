"""What the benchmark tools share: workloads, one runner process per backend with its memory
sampled over the whole process tree, vLLM's environment, llama.cpp's threads, statistics, tables
and JSON output."""

import argparse
import contextlib
import itertools
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time

TOOLS = pathlib.Path(__file__).resolve().parent
REPO = TOOLS.parent
RUNNER = TOOLS / "bench_runner.py"
DEFAULT_VLLM_VENV = REPO / ".venv-vllm"
DEFAULT_LLAMACPP_VENV = REPO / ".venv-llamacpp"
BACKEND_NAMES = ("conveyor", "hf", "llamacpp", "vllm")
VENV_BACKENDS = {"vllm": ("vLLM", "tools/setup_vllm_cpu.sh"), "llamacpp": ("llama.cpp", "tools/setup_llama_cpp.sh")}
TCMALLOC_CANDIDATES = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                       "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4",
                       "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4")
MEMORY_SAMPLE_S = 0.5
PSS_EVERY = 10  # samples: PSS every 5 s
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MiB = 1 << 20


class BenchError(RuntimeError):
    pass


# ---- workloads ----

def model_vocab_size(model: str) -> int:
    if not (pathlib.Path(model) / "config.json").exists():  # a GGUF file, or a directory holding one
        from conveyor.config import EngineConfig

        return EngineConfig(model=model).load_hf_config().vocab_size
    with open(pathlib.Path(model) / "config.json") as f:
        config = json.load(f)
    return config.get("vocab_size") or config["text_config"]["vocab_size"]


def random_prompts(num: int, input_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Token ids drawn uniformly, skipping the lowest ids where tokenizers keep their specials."""
    rng = random.Random(seed)
    low = min(16, vocab_size - 1)
    return [[rng.randrange(low, vocab_size) for _ in range(input_len)] for _ in range(num)]


def load_dataset(path: str, tokenizer_dir: str, num: int | None = None) -> list[list[int]]:
    """JSON lines, each {"prompt": text} or {"prompt_token_ids": [...]}; text is tokenized once here."""
    tokenizer, prompts = None, []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "prompt_token_ids" in row:
                prompts.append(list(row["prompt_token_ids"]))
            elif "prompt" in row:
                if tokenizer is None:
                    from transformers import AutoTokenizer

                    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
                prompts.append(tokenizer.encode(row["prompt"]))
            else:
                raise BenchError(f"{path}:{line_no}: expected a 'prompt' or 'prompt_token_ids' key")
            if num is not None and len(prompts) == num:
                break
    if not prompts:
        raise BenchError(f"{path} holds no prompts")
    return prompts


def salted(prompts: list[list[int]], vocab_size: int, salt: int) -> list[list[int]]:
    """The same prompts behind one token that differs per run, so no run hits a prefix cache
    that an earlier run filled."""
    rng = random.Random(salt)
    return [[rng.randrange(min(16, vocab_size - 1), vocab_size)] + p for p in prompts]


# ---- runner processes ----

def tcmalloc_path() -> str | None:
    return next((p for p in TCMALLOC_CANDIDATES if os.path.exists(p)), None)


def vllm_env(tuned: bool, kv_cache_gib: int | None = None, mode: str = "throughput") -> dict[str, str]:
    """vLLM's CPU backend, as shipped or at its best on a small CPU.

    As shipped ("auto" binding), vLLM keeps one core free for its engine-core process and binds its
    OpenMP threads to the rest, and preloads torch's libgomp but no allocator. Tuned: tcmalloc
    preloaded, as vLLM's CPU guide recommends, and for throughput OpenMP threads bound to every
    core. Batch-1 latency keeps the auto binding: the engine-core process busy-polls, and with
    every core pinned it preempts an OpenMP thread each step (see docs/benchmarks.md).
    """
    env = {} if kv_cache_gib is None else {"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib)}
    if tuned:
        tcmalloc = tcmalloc_path()
        if tcmalloc is None:
            raise BenchError("tuned vLLM needs tcmalloc: apt-get install -y libtcmalloc-minimal4")
        env["LD_PRELOAD"] = tcmalloc
        if mode == "throughput":
            env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{(os.cpu_count() or 1) - 1}"
    return env


def runner_command(backend: str, vllm_venv: str | os.PathLike = DEFAULT_VLLM_VENV,
                   llamacpp_venv: str | os.PathLike = DEFAULT_LLAMACPP_VENV) -> list[str]:
    """The runner under the python that has the backend: Conveyor's own, or the backend's virtualenv."""
    if backend not in BACKEND_NAMES:
        raise BenchError(f"backend must be one of {', '.join(BACKEND_NAMES)}, got {backend!r}")
    if backend not in VENV_BACKENDS:
        return [sys.executable, str(RUNNER)]
    venv = vllm_venv if backend == "vllm" else llamacpp_venv
    python = pathlib.Path(venv) / "bin" / "python"
    if not python.exists():
        name, script = VENV_BACKENDS[backend]
        raise BenchError(f"no {name} virtualenv at {venv}: run {script} first")
    return [str(python), str(RUNNER)]


def vllm_available(vllm_venv: str | os.PathLike = DEFAULT_VLLM_VENV) -> bool:
    return (pathlib.Path(vllm_venv) / "bin" / "python").exists()


def llamacpp_available(llamacpp_venv: str | os.PathLike = DEFAULT_LLAMACPP_VENV) -> bool:
    return (pathlib.Path(llamacpp_venv) / "bin" / "python").exists()


def check_llamacpp_model(model: str) -> None:
    """llama.cpp reads GGUF files only: refuse anything else before its runner starts."""
    if not (model.endswith(".gguf") and pathlib.Path(model).is_file()):
        what = "a directory" if pathlib.Path(model).is_dir() else "not a .gguf file" if pathlib.Path(model).exists() \
            else "not found"
        raise BenchError(f"llamacpp needs a GGUF file as --model (e.g. the default model, "
                         f"conveyor.config.default_model()); {model!r} is {what}")


def llamacpp_threads() -> int:
    """The threads Conveyor's worker computes with (no tensor parallelism), for llama.cpp to use too."""
    from conveyor.config import usable_cpus

    return len(usable_cpus())


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def tree_pids(root: int) -> list[int]:
    tree, stack, pids = _children(), [root], []
    while stack:
        pid = stack.pop()
        pids.append(pid)
        stack += tree.get(pid, [])
    return pids


def tree_rss(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * PAGE_SIZE
        except (OSError, IndexError, ValueError):
            continue
    return total


def tree_pss(pids: list[int]) -> int:
    """PSS splits shared pages between the processes that map them, so weights mapped by several
    processes count once. Reading it walks page tables: sample it less often than RSS."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration, ValueError):
            continue
    return total


def tree_memory(root: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes summed over `root` and all its descendants."""
    pids = tree_pids(root)
    return tree_rss(pids), tree_pss(pids)


class PeakMemory(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True, name="bench-memory")
        self.pid, self.peak_rss, self.peak_pss = pid, 0, 0
        self.stopped = threading.Event()

    def run(self) -> None:
        for n in itertools.count():
            if self.stopped.wait(MEMORY_SAMPLE_S):
                return
            pids = tree_pids(self.pid)
            self.peak_rss = max(self.peak_rss, tree_rss(pids))
            if n % PSS_EVERY == 0:
                self.peak_pss = max(self.peak_pss, tree_pss(pids))


def run_backend(workload: dict, *, vllm_venv: str | os.PathLike = DEFAULT_VLLM_VENV, vllm_tuned: bool = True,
                vllm_extra_env: dict[str, str] | None = None,
                llamacpp_venv: str | os.PathLike = DEFAULT_LLAMACPP_VENV, timeout: float = 3600.0,
                verbose: bool = False) -> dict:
    """Run one backend's runner process on `workload`; return its result plus peak tree memory."""
    if workload["backend"] == "llamacpp":
        check_llamacpp_model(workload["model"])
        workload = {**workload, "threads": workload.get("threads") or llamacpp_threads()}
    command = runner_command(workload["backend"], vllm_venv, llamacpp_venv)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if workload["backend"] == "vllm":
        env.update(vllm_env(vllm_tuned, workload.get("kv_cache_gib"), workload["mode"]), **(vllm_extra_env or {}))
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-") as tmp:
        workload_path, result_path = pathlib.Path(tmp, "workload.json"), pathlib.Path(tmp, "result.json")
        log_path = pathlib.Path(tmp, "runner.log")
        workload_path.write_text(json.dumps(workload))
        with open(log_path, "wb") as log:
            sink = None if verbose else log
            proc = subprocess.Popen(command + [str(workload_path), str(result_path)], env=env, cwd=tmp,
                                    stdout=sink, stderr=subprocess.STDOUT if sink else None,
                                    start_new_session=True)
            memory = PeakMemory(proc.pid)
            memory.start()
            try:
                with sigterm_as_exit():
                    code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise BenchError(f"{workload['backend']} runner took over {timeout:.0f} s") from None
            finally:
                memory.stopped.set()
                memory.join()
                kill_group(proc)  # whatever the backend left behind, or all of it when we stop early
        if code != 0 or not result_path.exists():
            tail = log_path.read_text(errors="replace")[-4000:]
            raise BenchError(f"{workload['backend']} runner exited with code {code}:\n{tail}")
        result = json.loads(result_path.read_text())
    result.update(peak_rss_mib=memory.peak_rss / MiB, peak_pss_mib=memory.peak_pss / MiB,
                  command=" ".join(command),
                  env={k: v for k, v in env.items() if k.startswith(("VLLM_", "LD_PRELOAD", "OMP_", "KMP_", "GOMP_"))})
    return result


@contextlib.contextmanager
def sigterm_as_exit():
    """A SIGTERM to the tool unwinds through `finally`, so the runner's process group dies too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def kill_group(proc: subprocess.Popen, grace: float = 0.0) -> None:
    """Kill a backend's process group and every descendant (some engines start their own groups).
    With `grace`, SIGTERM it first and give it that long to exit by itself, removing its files."""
    if grace and proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    for pid in tree_pids(proc.pid)[1:] if proc.poll() is None else []:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# ---- statistics and output ----

def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def median(values: list[float]) -> float:
    return percentile(values, 50)


def print_table(rows: list[dict], columns: list[tuple[str, str]], out=None) -> None:
    """columns: (key, header); floats print with 3 significant decimals, missing values as '-'."""
    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
        return str(value)

    out = out or sys.stdout
    table = [[header for _, header in columns]] + [[cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    for n, r in enumerate(table):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))), file=out)
        if n == 0:
            print("  ".join("-" * w for w in widths), file=out)


def write_json(path: str | os.PathLike | None, data: dict) -> None:
    if path is None:
        return
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")


# What emulates an AVX2-only CPU (an AMD EPYC before Zen 4, say) on a bigger x86 one: torch's
# kernels, oneDNN's and Conveyor's C kernels each limited to AVX2.
AVX2_LIMITS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "CONVEYOR_CPU_ARCH": "x86-64-v3"}


def cpu_model() -> str:
    """The CPU's name and the flags that decide its fast paths (-flag: absent), e.g.
    `Xeon: avx2 fma avx512f avx512_bf16 amx_bf16`, and the AVX2 limits where this process has them."""
    from conveyor.kernels.cpu import features

    limits = [f"{name}={os.environ[name]}" for name in AVX2_LIMITS if name in os.environ]
    return features.host().describe() + (f" under {' '.join(limits)}" if limits else "")


def machine_info() -> dict:
    import platform

    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(), "cpu": cpu_model(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "load_avg_1m": os.getloadavg()[0]}


def print_machine(machine: dict) -> None:
    print(f"machine: {machine['cpu']}, {machine['cpus']} cpus, load average {machine['load_avg_1m']:.2f}")


# ---- command line ----

def add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory (Hugging Face format) or GGUF file")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                        help="auto: each engine's own choice (Conveyor: what the CPU computes fastest)")
    parser.add_argument("--quantization", choices=("none", "gguf", "int8", "int4"),
                        help="engines' weight quantization (default: each engine's own for the model)")
    parser.add_argument("--max-num-seqs", type=int, help="engines' batch limit (hf: generate() batch size)")
    parser.add_argument("--max-num-batched-tokens", type=int, help="engines' token budget per step")
    parser.add_argument("--max-model-len", type=int, help="engines' context limit (default: the model's)")
    parser.add_argument("--speculative-config", type=json.loads, metavar="JSON",
                        help='speculative decoding, vLLM\'s spelling, for conveyor and vllm alike: '
                             '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}')
    parser.add_argument("--kv-cache-gib", type=int, default=2,
                        help="KV-cache memory of conveyor and vllm, the same for both (GiB; 0: each engine's default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    parser.add_argument("--vllm-venv", default=str(DEFAULT_VLLM_VENV), help="virtualenv made by setup_vllm_cpu.sh")
    parser.add_argument("--vllm-config", choices=("tuned", "default"), default="tuned",
                        help="vLLM CPU environment: tuned (tcmalloc, OpenMP bound to cores) or its defaults")
    parser.add_argument("--vllm-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for the vLLM runner, over --vllm-config's (repeatable)")
    parser.add_argument("--llamacpp-venv", default=str(DEFAULT_LLAMACPP_VENV),
                        help="virtualenv made by setup_llama_cpp.sh (llamacpp: --model must be a .gguf file; "
                             "it uses the file's own weight types and ignores --dtype and --quantization)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds one backend may run")
    parser.add_argument("--verbose", action="store_true", help="show the runner's own output")
    parser.add_argument("--out", help="write the results here as JSON")


def engine_args(args: argparse.Namespace) -> dict:
    """The engine limits given (of add_engine_args), the same for every backend."""
    names = ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "quantization", "speculative_config")
    return {name: getattr(args, name, None) for name in names if getattr(args, name, None) is not None}


def vllm_extra_env(args: argparse.Namespace) -> dict[str, str]:
    """--vllm-env NAME=VALUE items, as a dict."""
    extra = {}
    for item in getattr(args, "vllm_env", []):
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise BenchError(f"--vllm-env must be NAME=VALUE, got {item!r}")
        extra[name] = value
    return extra


def run_options(args: argparse.Namespace) -> dict:
    return dict(vllm_venv=args.vllm_venv, vllm_tuned=args.vllm_config == "tuned", vllm_extra_env=vllm_extra_env(args),
                llamacpp_venv=getattr(args, "llamacpp_venv", DEFAULT_LLAMACPP_VENV), timeout=args.timeout,
                verbose=args.verbose)


def run_one(args, backend: str, workload, summarize) -> dict:
    """Run `workload(args, backend)` in the backend's own process and summarise the result."""
    result = run_backend(workload(args, backend), **run_options(args))
    if backend == "vllm":
        result["backend"] = f"vllm ({args.vllm_config})"
    result["summary"] = summarize(result)
    return result


def report_one(args, benchmark: str, result: dict, columns) -> None:
    """Print one result as a table and write it, with the machine's facts, to `args.out`."""
    print_table([result["summary"]], columns)
    machine = machine_info()
    print_machine(machine)
    write_json(args.out, {"benchmark": benchmark, "machine": machine, "args": vars(args), "result": result})
