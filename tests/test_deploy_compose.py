"""deploy/: the compose files validate against the Compose Specification's schema (check-jsonschema's vendored
copy), and what they configure is what this service and its upstreams really read. Docker cannot run here."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT
from webapp.settings import Settings

DEPLOY = ROOT / "deploy"
COMPOSE_FILES = sorted(DEPLOY.glob("compose.*.yaml"))
UPSTREAMS = {"compose.vllm.yaml": ("vllm", 8000), "compose.tgi.yaml": ("tgi", 80)}


def check_jsonschema() -> str:
    found = shutil.which("check-jsonschema") or str(Path(sys.executable).with_name("check-jsonschema"))
    if not Path(found).exists():
        pytest.fail("check-jsonschema is not installed: run `make install` (it is pinned in requirements.txt)")
    return found


def interpolate(text: str) -> str:
    """Compose's ${VAR:-default} with no variables set, for the values a test reads."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", text)


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def test_there_is_a_compose_file_per_upstream() -> None:
    assert [p.name for p in COMPOSE_FILES] == sorted(UPSTREAMS)


def test_compose_files_match_the_compose_spec_schema() -> None:
    result = subprocess.run(
        [check_jsonschema(), "--builtin-schema", "vendor.compose-spec", *map(str, COMPOSE_FILES)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", sorted(UPSTREAMS))
def test_front_is_remote_mode_pointed_at_the_upstream(name: str) -> None:
    compose = load(DEPLOY / name)
    upstream, port = UPSTREAMS[name]
    services = compose["services"]
    assert set(services) == {upstream, "front"}
    front = services["front"]
    env = {k: interpolate(str(v)) for k, v in front["environment"].items()}
    assert env["ENGINE"] == "remote"
    assert env["REMOTE_URL"] == f"http://{upstream}:{port}/v1"
    assert str(port) in services[upstream]["expose"] and "ports" not in services[upstream]  # only the front is public
    # Every variable the front is given is a real setting, and together they make valid settings.
    fields = set(Settings.model_fields)
    secrets = dict(
        line.split("=", 1)
        for line in (DEPLOY / "front.env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    for key in [*env, *secrets]:
        assert key.lower() in fields, f"{name}: the front reads no {key}"
    settings = Settings(**{k.lower(): v for k, v in {**env, **secrets}.items()}, _env_file=None)  # type: ignore[arg-type]
    assert settings.engine == "remote" and settings.remote_api_key is not None
    assert [e["path"] for e in front["env_file"]] == ["front.env"]
    assert front["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}


@pytest.mark.parametrize("name", sorted(UPSTREAMS))
def test_upstream_gets_gpus_the_model_and_the_shared_key(name: str) -> None:
    upstream, _ = UPSTREAMS[name]
    service = load(DEPLOY / name)["services"][upstream]
    command = interpolate(" ".join(service["command"]))
    assert "GoToCompany/gemma2-9b-cpt-sahabatai-v1-instruct" in command
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert [e["path"] for e in service["env_file"]] == ["upstream.env"]
    # The key reaches the server through its own environment variable, never through compose interpolation.
    key_var = {"vllm": "VLLM_API_KEY", "tgi": "API_KEY"}[upstream]
    assert f'export {key_var}="$$REMOTE_API_KEY"' in " ".join(service["command"])
    parallel = {"vllm": "--tensor-parallel-size ${TENSOR_PARALLEL_SIZE:-1}", "tgi": "--num-shard ${NUM_SHARD:-1}"}
    assert parallel[upstream] in " ".join(service["command"])


def test_secret_files_are_examples_only_and_ignored() -> None:
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    for name in ("front.env", "upstream.env"):
        assert (DEPLOY / f"{name}.example").is_file()
        assert f"deploy/{name}" in ignored
    front = (DEPLOY / "front.env.example").read_text()
    upstream = (DEPLOY / "upstream.env.example").read_text()
    shared = re.search(r"^REMOTE_API_KEY=(.*)$", front, re.M)
    assert shared and f"REMOTE_API_KEY={shared.group(1)}" in upstream  # the same key on both sides
    assert "HF_TOKEN" not in front  # the internet-facing front never holds the hub token


def test_front_image_leaves_out_the_model_packages() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "requirements-front.exclude" in dockerfile and 'CMD ["python", "app.py"]' in dockerfile
    excluded = set((DEPLOY / "requirements-front.exclude").read_text().split())
    pinned = {line.split("==")[0].split("[")[0] for line in (ROOT / "requirements.txt").read_text().splitlines()}
    pinned.discard("")
    assert {"torch", "transformers", "bitsandbytes"} <= excluded
    assert excluded <= pinned, excluded - pinned  # every name matches a real pin
    kept = pinned - excluded - {line for line in pinned if line.startswith("#")}
    assert {"fastapi", "gradio", "openai", "uvicorn"} <= kept
