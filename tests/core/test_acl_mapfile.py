"""HAProxy-format map files: parse_map (bytes in) and load_map_file (one read), including
every error naming its file and line; plus the stubs of the compiled module."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastgw._core.acl import Map, load_map_file, parse_map
from fastgw.errors import ConfigError

HOSTS = b"""\
# host -> backend
www.example.com      web
api.example.com\tapi   # not a comment: values run to the end of the line
   indented.example.com    indented backend with spaces\x20\x20
\t# an indented comment

key-only.example.com
crlf.example.com crlf\r
"""


def test_parse_map_lines() -> None:
    m = parse_map(HOSTS, "str", source="hosts.map")
    assert [m.entry(i) for i in range(len(m))] == [
        (b"www.example.com", b"web"),
        (b"api.example.com", b"api   # not a comment: values run to the end of the line"),
        (b"indented.example.com", b"indented backend with spaces"),
        (b"key-only.example.com", b""),
        (b"crlf.example.com", b"crlf"),
    ]
    assert m.lookup(b"crlf.example.com") == b"crlf"
    assert m.lookup(b"key-only.example.com") == b""
    assert m.location(0) == ("hosts.map", "line 2")
    assert m.location(4) == ("hosts.map", "line 8")
    assert m.source == "hosts.map"


def test_parse_map_empty_and_comments_only() -> None:
    assert len(parse_map(b"", "beg")) == 0
    assert len(parse_map(b"# nothing\n\n   \n\t\n", "ip")) == 0


def test_parse_map_kinds_and_case() -> None:
    m = parse_map(b"/API api\n/static static\n", "beg", ignore_case=True)
    assert m.lookup(b"/api/v1") == b"api"
    assert m.kind == "beg" and m.ignore_case


def test_bad_lines_name_file_and_line() -> None:
    data = b"10.0.0.0/8 a\n# ok\n10.0.0.0/40 b\n\nnot-an-ip c\n192.168.0.0/16 d\n"
    with pytest.raises(ConfigError) as ei:
        parse_map(data, "ip", source="nets.map")
    assert [p[:2] for p in ei.value.problems] == [("nets.map", "line 3"), ("nets.map", "line 5")]
    assert "prefix length" in ei.value.problems[0][2]
    assert "nets.map: line 5: " in str(ei.value)


def test_bad_regex_and_nul_lines() -> None:
    with pytest.raises(ConfigError) as ei:
        parse_map(b"^/ok ok\n^/bad( bad\nnul\x00byte x\n", "reg", source="re.map")
    assert [p[:2] for p in ei.value.problems] == [("re.map", "line 2"), ("re.map", "line 3")]
    assert "regular expression" in ei.value.problems[0][2]
    assert "NUL" in ei.value.problems[1][2]


def test_unknown_kind() -> None:
    with pytest.raises(ConfigError) as ei:
        parse_map(b"a b\n", "prefix", source="x.map")
    assert ei.value.problems[0][:2] == ("x.map", "kind")


def test_load_map_file(tmp_path: Path) -> None:
    p = tmp_path / "paths.map"
    p.write_bytes(b"/api api\n/api/admin admin\n")
    m = load_map_file(p, "beg")
    assert m.lookup(b"/api/admin/users") == b"admin"
    assert m.location(1) == (str(p), "line 2")
    assert load_map_file(str(p), "dir", True).lookup(b"/x/API") == b"api"


def test_load_map_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        load_map_file(tmp_path / "missing.map", "str")
    assert ei.value.problems[0][:2] == (str(tmp_path / "missing.map"), "file")
    p = tmp_path / "bad.map"
    p.write_bytes(b"::1 lo\n::1/200 bad\n")
    with pytest.raises(ConfigError) as ei:
        load_map_file(p, "ip")
    assert ei.value.problems[0][:2] == (str(p), "line 2")


def test_reload_is_a_new_map(tmp_path: Path) -> None:
    # What a reload does: build the new map aside, then swap one reference. The old
    # map keeps answering as before for whoever still holds it.
    p = tmp_path / "r.map"
    p.write_bytes(b"/a old\n")
    current = load_map_file(p, "beg")
    held = current
    p.write_bytes(b"/a new\n/b b\n")
    current = load_map_file(p, "beg")
    assert held.lookup(b"/a") == b"old" and held.lookup(b"/b") is None
    assert current.lookup(b"/a") == b"new" and current.lookup(b"/b") == b"b"
    assert isinstance(current, Map)


def test_stubs_match_the_compiled_module(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    allow = tmp_path / "allow.txt"
    allow.write_text(
        "fastgw\\._core\\.acl\\.__test__\n"
        "fastgw\\._core\\.acl\\.(.*\\.)?__reduce_cython__\n"
        "fastgw\\._core\\.acl\\.(.*\\.)?__setstate_cython__\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "fastgw._core.acl", "--allowlist", str(allow)],
        capture_output=True,
        text=True,
        check=False,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
