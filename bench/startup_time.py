"""Seconds from `python app.py` to `GET /ready` == 200: a cold start (empty model cache) and a cached one.

    python bench/startup_time.py [--runs 1] [--keep-cache DIR]

Each start is a fresh process with MODEL_ID=embedded on a free port; it is stopped with SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.loadgen import free_port

ROOT = Path(__file__).resolve().parent.parent


LOADED = re.compile(r"model ready: .*loaded in ([0-9.]+) s")


def time_to_ready(cache_dir: Path, timeout_s: float = 600) -> tuple[float, float | None]:
    """(seconds to /ready, seconds of that spent loading the model as the service logged it)."""
    port = free_port()
    env = {
        **os.environ,
        "MODEL_ID": "embedded",
        "MODEL_CACHE_DIR": str(cache_dir),
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "API_KEYS": "bench-key",
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    started = time.perf_counter()
    log = tempfile.NamedTemporaryFile("w+", prefix="startup-", suffix=".log")  # noqa: SIM115
    process = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        while time.perf_counter() - started < timeout_s:
            if process.poll() is not None:
                raise RuntimeError(f"app.py exited with {process.returncode} before it was ready")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as response:
                    if response.status == 200:
                        ready = time.perf_counter() - started
                        found = LOADED.search(Path(log.name).read_text())
                        return ready, float(found.group(1)) if found else None
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        raise TimeoutError(f"not ready after {timeout_s} s")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1, help="cold/cached pairs to run")
    args = parser.parse_args()
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="model-cache-") as directory:
            cold, cold_load = time_to_ready(Path(directory))
            cached, cached_load = time_to_ready(Path(directory))
        print(
            f"run {run + 1}: cold start (GGUF dequantisation) {cold:.1f} s to /ready (model load {cold_load} s); "
            f"cached start {cached:.1f} s to /ready (model load {cached_load} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
