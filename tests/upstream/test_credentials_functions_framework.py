"""End to end against a real function: Google's functions-framework serves
``functions/main.py:echo_auth`` on 127.0.0.1, the gateway calls it with a Google ID
token from a local fake metadata server, and the function reports what it received."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import jwt
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import rsa

from fastgw.config.model import CredentialConfig
from tests.e2e.helpers import Client, make_config
from tests.upstream.gateway_support import TokenMint, running

FUNCTIONS = Path(__file__).parent / "functions"


def _framework() -> str:
    exe = Path(sys.executable).parent / "functions-framework"
    if exe.exists():
        return str(exe)
    found = shutil.which("functions-framework")
    if found is None:
        pytest.fail("functions-framework is not installed (pip install -e '.[test]')")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _wait_listening(proc: trio.Process, port: int) -> None:
    """Until the function accepts connections; fails if the process exits first."""
    with trio.fail_after(60):
        while True:
            if proc.poll() is not None:
                pytest.fail(f"functions-framework exited with {proc.returncode}")
            try:
                s = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await s.aclose()
            return


@pytest.fixture
async def function_url() -> AsyncIterator[str]:
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = await trio.lowlevel.open_process(
        [
            _framework(),
            "--target=echo_auth",
            f"--source={FUNCTIONS / 'main.py'}",
            "--host=127.0.0.1",
            f"--port={port}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await _wait_listening(proc, port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        with trio.move_on_after(10):
            await proc.wait()


async def test_functions_framework_sees_the_id_token(
    nursery: trio.Nursery, rsa_key: rsa.RSAPrivateKey, function_url: str
) -> None:
    mint = TokenMint(rsa_key)
    meta = await mint.start(nursery)
    cred = CredentialConfig(type="google_id_token", metadata_url=meta)
    config = make_config([function_url], backend_kw={"credential": cred})
    async with running(config) as (gw, port):
        c = await Client.open(port)
        r = await c.request(b"GET", b"/any?q=1", [(b"Authorization", b"Bearer caller")])
        assert r.status == 200, r.body
        seen = json.loads(r.body)
        assert seen["X-Forwarded-Authorization"] == "Bearer caller"
        token = seen["Authorization"].removeprefix("Bearer ")
        claims = jwt.decode(
            token, rsa_key.public_key(), algorithms=["RS256"], audience=function_url
        )
        assert claims["sub"] == "gateway-sa"

        # The same function behind X-Serverless-Authorization: the caller's own
        # Authorization reaches it untouched.
        serverless = dataclasses.replace(cred, header="x-serverless-authorization")
        gw.reload(make_config([function_url], backend_kw={"credential": serverless}))
        r = await c.request(b"GET", b"/", [(b"Authorization", b"Bearer caller")])
        seen = json.loads(r.body)
        assert seen["Authorization"] == "Bearer caller"
        assert seen["X-Serverless-Authorization"] == "Bearer " + token  # same cache
        assert seen["X-Forwarded-Authorization"] is None
        await c.aclose()
    assert mint.count(function_url) == 1
