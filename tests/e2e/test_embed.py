"""The embedding examples, run as a user runs them, in a real subprocess: the ``python``
block under "## Embedding" in README.md exactly as written, and examples/embed.py (a
Gateway built from config objects, served in the program's nursery, one request through
it to the demo function, then cancelled)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "embed.py"


def readme_block(heading: str) -> str:
    """The first ```python block under the ``## heading`` section of README.md."""
    text = (ROOT / "README.md").read_text()
    section = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert section is not None, f'README.md has no "## {heading}" section'
    block = re.search(r"^```python\n(.*?)^```$", section[1], re.M | re.S)
    assert block is not None, f'no python block under "## {heading}"'
    return block[1]


async def run_python(argv: list[str], cwd: Path) -> str:
    with trio.fail_after(30):
        result = await trio.run_process(
            [sys.executable, *argv], capture_stdout=True, capture_stderr=True, check=False, cwd=cwd
        )
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    assert result.stderr == b""
    return out


async def test_readme_embedding_block_runs(tmp_path: Path) -> None:
    out = await run_python(["-c", readme_block("Embedding")], cwd=tmp_path)
    assert re.fullmatch(r"listening on \[\('127\.0\.0\.1', [1-9]\d*\)\]\n", out), out


async def test_embed_example_proxies_a_request(tmp_path: Path) -> None:
    lines = (await run_python([str(EXAMPLE)], cwd=tmp_path)).splitlines()
    assert len(lines) == 4, lines
    assert re.fullmatch(r"gateway on http://127\.0\.0\.1:[1-9]\d*", lines[0]), lines[0]
    assert lines[1] == "HTTP/1.1 200 OK"
    assert lines[2] == "Hello, embedder! This is the fastgw demo function."
    # The route stripped /api, and the function saw the gateway's Via: it went through it.
    assert lines[3] == "function saw path=/hello via=1.1 fastgw"
