"""The command line's rough edges: --version, settings in `serve --help`, errors naming variables."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

import service
from service.cli import build_parser, main
from service.settings import Settings, describe_error, env_name

pytestmark = pytest.mark.usefixtures("no_lungserve_env")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"lungserve {service.__version__}"


def test_serve_help_lists_every_setting_by_its_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = capsys.readouterr().out
    for field in Settings.model_fields:
        assert env_name(field) in text
    assert "LUNGSERVE_MAX_BATCH_SIZE (default: 4)" in text
    assert "LUNGSERVE_API_KEYS_FILE (default: unset)" in text


def test_invalid_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUNGSERVE_MAX_BATCH_SIZE", "lots")
    monkeypatch.setenv("LUNGSERVE_PROVIDER", "tpu")
    with pytest.raises(ValidationError) as info:
        Settings()
    lines = describe_error(info.value).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("LUNGSERVE_MAX_BATCH_SIZE: ")
    assert "'lots'" in lines[0]
    assert lines[1].startswith("LUNGSERVE_PROVIDER: ")
    assert "'tpu'" in lines[1]
    assert "max_batch_size" not in describe_error(info.value)


def test_inconsistent_settings_name_the_variables() -> None:
    with pytest.raises(ValidationError) as info:
        Settings(max_batch_size=32, queue_limit=16, max_files_per_request=8)
    assert describe_error(info.value) == "LUNGSERVE_MAX_BATCH_SIZE (32) must not exceed LUNGSERVE_QUEUE_LIMIT (16)"


def test_serve_refuses_an_invalid_setting_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LUNGSERVE_QUEUE_LIMIT", "0")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "LUNGSERVE_QUEUE_LIMIT: Input should be greater than or equal to 1 (got '0')" in err


@pytest.mark.parametrize(
    ("value", "origins"),
    [
        ("https://viewer.lab.example", ["https://viewer.lab.example"]),
        ("https://a.example, https://b.example", ["https://a.example", "https://b.example"]),
        ('["https://a.example"]', ["https://a.example"]),
        ("*", ["*"]),
    ],
)
def test_cors_origins_from_the_environment(monkeypatch: pytest.MonkeyPatch, value: str, origins: list[str]) -> None:
    monkeypatch.setenv("LUNGSERVE_CORS_ORIGINS", value)
    assert Settings().cors_origins == origins
    assert Settings().api_keys_file is None


def test_api_keys_file_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LUNGSERVE_API_KEYS_FILE", str(tmp_path / "keys"))
    assert Settings().api_keys_file == tmp_path / "keys"


def test_serve_refuses_a_bad_keys_file_naming_the_line_not_the_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    keys.write_text("viewer:viewer-key-0123456789abcdef\nviewer:another-key-0123456789abcdef\n")
    monkeypatch.setenv("LUNGSERVE_API_KEYS_FILE", str(keys))
    monkeypatch.setenv("LUNGSERVE_WORKERS", "1")  # this process refuses it, not a front
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "line 2: the name 'viewer' is used twice" in err
    assert "0123456789abcdef" not in err


@pytest.mark.parametrize("cpus", [1, 2])
def test_serve_is_one_process_on_one_usable_cpu_and_a_supervisor_on_more(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cpus: int
) -> None:
    """LUNGSERVE_WORKERS unset: the usable CPUs decide (service.cpus)."""
    monkeypatch.setattr("service.settings.usable_cpus", lambda: cpus)
    supervised: list[int] = []

    def supervise(settings: Settings, overrides: dict[str, object]) -> int:
        supervised.append(settings.workers)
        return 0

    monkeypatch.setattr("service.cli._serve_supervised", supervise)
    keys = tmp_path / "keys"
    keys.write_text("viewer:viewer-key-0123456789abcdef\nviewer:another-key-0123456789abcdef\n")
    monkeypatch.setenv("LUNGSERVE_API_KEYS_FILE", str(keys))  # one process stops here, before serving
    if cpus == 1:
        assert main(["serve"]) == 2
        assert supervised == []
    else:
        assert main(["serve"]) == 0
        assert supervised == [cpus]


def test_serve_workers_flag_wins_over_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("service.settings.usable_cpus", lambda: 1)
    supervised: list[tuple[int, dict[str, object]]] = []

    def supervise(settings: Settings, overrides: dict[str, object]) -> int:
        supervised.append((settings.workers, overrides))
        return 0

    monkeypatch.setattr("service.cli._serve_supervised", supervise)
    assert main(["serve", "--workers", "3"]) == 0
    assert supervised == [(3, {"workers": 3})]  # passed on to the fronts' environment
