"""The fastgw command: ``python -m fastgw`` in a real subprocess for what users see
(output, exit codes, no tracebacks); ``main()`` in-process, with a stand-in server module,
for what ``serve`` hands to the server."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from fastgw import __version__
from fastgw.cli import main
from fastgw.config import GatewayConfig

GOOD = """
[[listeners]]
name = "a"
address = "127.0.0.1:0"

[[listeners]]
name = "b"
address = "[::1]:0"

[backends.fn]
endpoints = ["http://127.0.0.1:9000"]

[[routes]]
name = "all"
backend = "fn"
"""

BAD = """
[limits]
max_connections = -1

[[listeners]]
name = "a"
address = "127.0.0.1"

[backends.fn]
endpoint = ["http://127.0.0.1:9000"]

[[routes]]
name = "all"
backend = "fm"
"""


def fastgw(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastgw", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
    )


def test_version() -> None:
    result = fastgw("--version")
    assert (result.returncode, result.stdout, result.stderr) == (0, f"fastgw {__version__}\n", "")


def test_check_ok(tmp_path: Path) -> None:
    (tmp_path / "gateway.toml").write_text(GOOD)
    result = fastgw("check", "-c", "gateway.toml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "OK: 2 listeners, 1 backends, 1 routes\n"
    assert result.stderr == ""


def test_check_prints_every_problem(tmp_path: Path) -> None:
    (tmp_path / "gateway.toml").write_text(BAD)
    result = fastgw("check", "--config", "gateway.toml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "gateway.toml: limits.max_connections: must be greater than 0, got -1",
        'gateway.toml: listeners[0].address: "127.0.0.1" has no port; '
        "expected HOST:PORT, e.g. 127.0.0.1:8080",
        'gateway.toml: backends.fn.endpoint: unknown key "endpoint"; did you mean "endpoints"?',
        "gateway.toml: backends.fn.endpoints: "
        "missing (required): a backend needs at least one endpoint URL",
        'gateway.toml: routes[0].backend: unknown backend "fm" (known: fn)',
    ]


def test_check_names_the_included_file(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "gateway.toml").write_text('include = ["routes.toml"]\n' + GOOD)
    (tmp_path / "conf" / "routes.toml").write_text("[[routes]]\nname = 2\n")
    result = fastgw("check", "-c", "conf/gateway.toml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "conf/routes.toml: routes[0].name: expected string, got integer 2",
        "conf/routes.toml: routes[0].backend: missing (required unless path_map names the backend)",
    ]


def test_check_syntax_error_names_line(tmp_path: Path) -> None:
    (tmp_path / "gateway.toml").write_text('[gateway]\nvia = "1.1 x\n')
    result = fastgw("check", "-c", "gateway.toml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("gateway.toml: line 2, column 13: invalid TOML: ")
    assert "Traceback" not in result.stderr


def test_check_missing_file(tmp_path: Path) -> None:
    result = fastgw("check", "-c", "nope.toml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == "nope.toml: cannot read config file: No such file or directory\n"


def test_check_does_not_import_the_server(tmp_path: Path) -> None:
    (tmp_path / "gateway.toml").write_text(GOOD)
    code = (
        "import sys\n"
        "from fastgw.cli import main\n"
        "assert main(['check', '-c', 'gateway.toml']) == 0\n"
        "print(sorted(m for m in ('fastgw.server', 'trio') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["check"],
        ["bogus"],
        ["serve"],
        ["serve", "-c", "x.toml", "--demo"],
        ["serve", "-c", "x.toml", "--port", "1"],
        ["serve", "--demo", "--port", "70000"],
        ["serve", "--demo", "--port", "http"],
    ],
)
def test_usage_errors_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "usage: fastgw" in err
    assert "Traceback" not in err


def test_usage_error_in_a_subprocess() -> None:
    result = fastgw("serve", "--port", "1", "-c", "x.toml")
    assert result.returncode == 2
    assert "--port goes with --demo" in result.stderr


# --- serve, with a stand-in for fastgw.server ------------------------------------------


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """Replace fastgw.server with a recorder; serve imports it by name at call time."""
    calls: list[tuple[str, Any]] = []
    fake = types.ModuleType("fastgw.server")

    def run(config: GatewayConfig, *, demo: bool = False) -> int:
        calls.append(("run", config))
        return 0

    def run_demo(listen_port: int) -> int:
        calls.append(("run_demo", listen_port))
        return 3

    fake.run = run  # type: ignore[attr-defined]
    fake.run_demo = run_demo  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fastgw.server", fake)
    return calls


def test_serve_loads_the_config_and_runs_it(tmp_path: Path, server: list[tuple[str, Any]]) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(GOOD)
    assert main(["serve", "-c", str(path)]) == 0
    [(what, config)] = server
    assert what == "run"
    assert isinstance(config, GatewayConfig)
    assert [listener.name for listener in config.listeners] == ["a", "b"]


def test_serve_with_a_bad_config_does_not_start(
    tmp_path: Path, server: list[tuple[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(BAD)
    assert main(["serve", "-c", str(path)]) == 1
    assert server == []
    assert (
        f"{path}: limits.max_connections: must be greater than 0, got -1" in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("args", "port"), [([], 8080), (["--port", "0"], 0), (["--port", "9001"], 9001)]
)
def test_serve_demo(server: list[tuple[str, Any]], args: list[str], port: int) -> None:
    assert main(["serve", "--demo", *args]) == 3  # the server's exit status, passed on
    assert server == [("run_demo", port)]
