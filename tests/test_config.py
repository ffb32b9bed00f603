"""Configuration: one Settings class, documented in the README, shown by --help, validated at start-up."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT
from webapp import cli
from webapp.settings import Settings


def run_app(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k not in {name.upper() for name in Settings.model_fields}}
    return subprocess.run(
        [sys.executable, "app.py", *args],
        cwd=ROOT,
        env={**environment, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_help_lists_every_setting() -> None:
    result = run_app("--help")
    assert result.returncode == 0, result.stderr
    for name, field in Settings.model_fields.items():
        assert name.upper() in result.stdout, name
        if not cli.is_secret(field):
            assert cli.flag_name(name) in result.stdout, name


@pytest.mark.parametrize(
    ("env", "args", "named"),
    [
        ({"PORT": "abc"}, (), "PORT"),
        ({}, ("--port", "70000"), "PORT"),
        ({"LOG_FORMAT": "xml"}, (), "LOG_FORMAT"),
        ({"SHUTDOWN_TIMEOUT_S": "-1"}, (), "SHUTDOWN_TIMEOUT_S"),
        ({"METRICS_PUBLIC": "perhaps"}, (), "METRICS_PUBLIC"),
        ({"MODEL_ID": "  "}, (), "MODEL_ID"),
    ],
)
def test_an_invalid_value_stops_start_up_with_one_line_naming_it(env: dict, args: tuple, named: str) -> None:
    result = run_app(*args, **env)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("invalid configuration: ") and named in lines[0]
    assert "Traceback" not in result.stderr


def test_a_secret_is_not_echoed_in_the_error() -> None:
    result = run_app(API_KEYS_FILE="/nonexistent/keys", PORT="bad", API_KEYS="sk-do-not-echo-1234")
    assert result.returncode != 0
    assert "sk-do-not-echo-1234" not in result.stderr + result.stdout


def test_secrets_are_environment_only() -> None:
    result = run_app("--api-keys", "sk-on-the-command-line")
    assert result.returncode == 2 and "unrecognized arguments" in result.stderr


def test_options_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "1234")
    monkeypatch.setenv("LOG_PROMPTS", "true")
    assert cli.load_settings([]).port == 1234
    settings = cli.load_settings(["--port", "99", "--no-log-prompts", "--metrics-public"])
    assert settings.port == 99 and settings.log_prompts is False and settings.metrics_public is True


def test_readme_settings_table_is_current() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in Settings.model_fields:
        assert f"`{name.upper()}`" in readme, f"{name.upper()} is not documented in README.md"
    assert cli.readme_with_table(readme) == readme, (
        "the README settings table is stale: run `make settings-table` (python -m webapp.cli --write)"
    )


def test_every_setting_has_a_description() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description, f"{name} has no description (it is the README and --help text)"
