"""Run the Dockerfile's install and start commands in a fresh virtual environment (Docker cannot run here).

    python deploy/dockerfile_smoke.py [--torch-index URL] [--keep]

1. Creates a fresh venv and runs the build stage's RUN command(s) in it, from the repository root,
   with the Dockerfile's TORCH_INDEX (or --torch-index, e.g. https://pypi.org/simple where the
   PyTorch index is unreachable).
2. Starts the image's CMD with that venv (MODEL_ID=embedded, a free port, a fresh model cache),
   waits for GET /ready == 200, checks /health, sends SIGTERM and expects exit status 0.

Needs network access to the package indexes and a few minutes; a CI step, not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buffer = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        buffer += line
        keyword, _, rest = buffer.partition(" ")
        out.append((keyword.upper(), rest.strip()))
        buffer = ""
    return out


def stages(text: str) -> dict[str, list[tuple[str, str]]]:
    """Instructions per stage name (FROM ... AS name)."""
    result: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for keyword, args in instructions(text):
        if keyword == "FROM":
            name = args.split()[-1] if " AS " in args.upper() else str(len(result))
            current = result.setdefault(name, [])
        current.append((keyword, args))
    return result


def build_run_commands(text: str) -> list[str]:
    return [args for keyword, args in stages(text)["build"] if keyword == "RUN" and "pip install" in args]


def arg_default(text: str, name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)", text, re.MULTILINE)
    if match is None:
        raise SystemExit(f"the Dockerfile has no ARG {name}=...")
    return match.group(1)


def start_command(text: str) -> list[str]:
    cmd = [args for keyword, args in stages(text)["runtime"] if keyword == "CMD"][-1]
    return list(json.loads(cmd))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--torch-index", help="override the Dockerfile's TORCH_INDEX")
    parser.add_argument("--keep", action="store_true", help="keep the temporary venv")
    args = parser.parse_args()
    text = DOCKERFILE.read_text(encoding="utf-8")
    work = Path(tempfile.mkdtemp(prefix="dockerfile-smoke-"))
    venv = work / "venv"
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        env = {
            **os.environ,
            "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
            "VIRTUAL_ENV": str(venv),
            "TORCH_INDEX": args.torch_index or arg_default(text, "TORCH_INDEX"),
            "PIP_NO_CACHE_DIR": "1",
        }
        for command in build_run_commands(text):
            print(f"+ {command}", flush=True)
            subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=ROOT, env=env, check=True)

        command = start_command(text)
        print(f"+ {' '.join(command)}", flush=True)
        serve_env = {
            **env,
            "MODEL_ID": "embedded",
            "HOST": "127.0.0.1",
            "PORT": "0",
            "MODEL_CACHE_DIR": str(work / "model-cache"),
            "API_KEYS": "smoke-test-key",
            "GRADIO_ANALYTICS_ENABLED": "False",
        }
        log = work / "server.log"
        with log.open("w") as sink:
            process = subprocess.Popen(command, cwd=ROOT, env=serve_env, stdout=sink, stderr=subprocess.STDOUT)
        url = ""
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and process.poll() is None:
            if not url:
                found = re.search(r"Uvicorn running on (http://\S+)", log.read_text())
                url = found.group(1) if found else ""
            try:
                if url and urllib.request.urlopen(f"{url}/ready", timeout=2).status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            process.kill()
            raise SystemExit(f"the server never became ready:\n{log.read_text()[-4000:]}")
        assert urllib.request.urlopen(f"{url}/health", timeout=5).status == 200
        process.send_signal(signal.SIGTERM)
        status = process.wait(120)
        if status != 0:
            raise SystemExit(f"exit status {status} after SIGTERM:\n{log.read_text()[-4000:]}")
        print("dockerfile smoke test passed: installed, ready, drained, exit 0", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
