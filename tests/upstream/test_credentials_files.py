"""Tokens from files (static bearer tokens, Azure function keys): re-read when the file
changes, looked at no more than once a second, never sent with bad characters or past a
JWT's exp. On trio's autojump MockClock; real files in tmp_path."""

from __future__ import annotations

import math
import os
from pathlib import Path

import h11
import pytest
import trio
from trio.testing import MockClock

from fastgw._core.http import StripSet, build_request_head, parse_request_head
from fastgw.upstream.credentials import (
    BearerHeader,
    CredentialCache,
    CredentialError,
    FileTokenSource,
    RefreshPolicy,
    StaticTokenSource,
    TokenCredential,
    azure_function_key_header,
)
from tests.upstream.support import mint_id_token, wall


def replace(path: Path, text: str) -> None:
    """An atomic replace, as Kubernetes (symlink swap) and most tools do."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def started(nursery: trio.Nursery, src: FileTokenSource) -> CredentialCache[TokenCredential]:
    cache = CredentialCache(src, "fn", RefreshPolicy())
    await nursery.start(cache.run)
    return cache


def token_now(cache: CredentialCache[TokenCredential]) -> str | None:
    cred = cache.current(trio.current_time())
    return None if cred is None else cred.token


async def test_reread_when_the_file_changes_at_most_one_stat_a_second(
    autojump_clock: MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    path = tmp_path / "token"
    path.write_text("first-token\n")
    src = FileTokenSource(str(path))
    cache = await started(nursery, src)
    first = await cache.wait_current()
    assert first.token == "first-token"
    assert first.expires_at == math.inf

    await trio.sleep(30.0)
    assert cache.current(trio.current_time()) is first  # same object while unchanged
    assert 30 <= src.watch.stats <= 31
    assert src.watch.reads == 1
    assert cache.refreshes_ok == 1

    replace(path, "second-token\n")
    await trio.sleep(1.01)
    assert token_now(cache) == "second-token"
    assert src.watch.reads == 2

    # An in-place rewrite of the same size is seen through the mtime.
    path.write_text("third--token\n")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    await trio.sleep(1.01)
    assert token_now(cache) == "third--token"
    assert cache.refreshes_ok == 3
    assert cache.refreshes_failed == 0


async def test_broken_file_keeps_the_last_good_token_until_fixed(
    autojump_clock: MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    path = tmp_path / "key"
    path.write_text("good-key")
    src = FileTokenSource(str(path), kind="azure_function_key", jwt_expiry=False)
    cache = await started(nursery, src)
    good = await cache.wait_current()

    replace(path, "\n")
    await trio.sleep(5.0)
    assert cache.current(trio.current_time()) is good
    assert cache.last_error == f"token in {path} is empty"
    failed = cache.refreshes_failed
    assert 4 <= failed <= 6  # checked once a second, the error kept until the file changes
    assert src.watch.reads == 2

    path.unlink()
    await trio.sleep(2.0)
    assert "No such file" in (cache.last_error or "")
    assert cache.current(trio.current_time()) is good

    replace(path, "new-key")
    await trio.sleep(1.01)
    assert token_now(cache) == "new-key"
    assert cache.last_error is None


async def test_missing_file_at_start_then_created(
    autojump_clock: MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    path = tmp_path / "late"
    cache = await started(nursery, FileTokenSource(str(path)))
    await trio.sleep(3.0)
    assert token_now(cache) is None
    path.write_text("arrived")
    with trio.fail_after(1.01):
        assert (await cache.wait_current()).token == "arrived"


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("", "is empty"),
        ("abc\r\nX-Injected: 1", "characters not allowed"),
        ("two words", "characters not allowed"),
        ("x" * 8193, "over 8192 characters"),
        ("caf\u00e9", "characters not allowed"),
    ],
)
async def test_tokens_unfit_for_a_header_are_refused(
    tmp_path: Path, content: str, match: str
) -> None:
    path = tmp_path / "token"
    path.write_text(content)
    with pytest.raises(CredentialError, match=match):
        await FileTokenSource(str(path)).refresh(0.0)


async def test_jwt_in_a_file_is_never_sent_past_its_exp(
    autojump_clock: MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A Kubernetes projected service-account token: a JWT rotated in place. If the
    rotation stops, the token stops being sent at its exp (less the margin)."""
    path = tmp_path / "sa-token"
    path.write_text(mint_id_token("https://fn.example", 600))
    src = FileTokenSource(str(path), wall=wall)
    cache = await started(nursery, src)
    first = await cache.wait_current()
    assert first.expires_at == pytest.approx(600.0, abs=1)
    await trio.sleep_until(594.0)
    assert cache.current(trio.current_time()) is first
    await trio.sleep_until(595.0)  # margin: min(5 s, 60 s)
    assert cache.current(trio.current_time()) is None

    replace(path, mint_id_token("https://fn.example", 600))
    await trio.sleep(1.01)
    fresh = cache.current(trio.current_time())
    assert fresh is not None and fresh.expires_at == pytest.approx(trio.current_time() + 600, abs=2)


async def test_jwt_expiry_can_be_turned_off_and_non_jwts_never_expire(tmp_path: Path) -> None:
    path = tmp_path / "t"
    path.write_text(mint_id_token("aud", 10))
    assert (await FileTokenSource(str(path), jwt_expiry=False).refresh(0.0)).expires_at == math.inf
    path.write_text("a.b.c")  # three parts, not a JWT
    assert (await FileTokenSource(str(path)).refresh(0.0)).expires_at == math.inf


async def test_static_token() -> None:
    src = StaticTokenSource(" from-env \n", what="FN_KEY")
    a = await src.refresh(1.0)
    assert a.token == "from-env" and a.expires_at == math.inf
    assert await src.refresh(2.0) is a
    with pytest.raises(CredentialError, match="FN_KEY contains characters not allowed"):
        StaticTokenSource("a\nb", what="FN_KEY")


def test_azure_function_key_replaces_the_callers() -> None:
    hdr = azure_function_key_header()
    assert hdr.strip_names == (b"x-functions-key",)
    assert not hdr.forwards
    cred = TokenCredential(obtained_at=0.0, expires_at=math.inf, token="k3y==")
    raw = (
        b"GET /api/hello HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer caller\r\n"
        b"x-functions-key: callers-guess\r\n\r\n"
    )
    head = parse_request_head(raw)
    assert head is not None
    out = build_request_head(
        head,
        host=b"app.azurewebsites.net",
        extra=hdr.render(cred),
        strip=StripSet(names=hdr.strip_names),
    )
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(out)
    ev = conn.next_event()
    assert isinstance(ev, h11.Request)
    assert [v for k, v in ev.headers if k == b"x-functions-key"] == [b"k3y=="]
    assert [v for k, v in ev.headers if k == b"authorization"] == [b"Bearer caller"]


def test_bearer_header_options() -> None:
    cred = TokenCredential(obtained_at=0.0, expires_at=math.inf, token="tok")
    assert BearerHeader(forward_caller_as=None).render(cred, b"ignored") == (
        b"Authorization: Bearer tok\r\n"
    )
    assert BearerHeader(forward_caller_as=None).strip_names == (b"authorization",)
    assert BearerHeader("X-Api-Token", scheme=None, forward_caller_as=None).render(cred) == (
        b"X-Api-Token: tok\r\n"
    )
    for bad in (
        {"name": "Bad Name"},
        {"name": "X-Token", "forward_caller_as": "X-Fwd"},  # forwarding needs Authorization
        {"scheme": "Bearer\r\n"},
    ):
        with pytest.raises(ValueError):
            BearerHeader(**bad)
