"""fastgw's error classes.

Protocol errors carry the HTTP status the connection edge answers with, so the edge never
matches on a message. The compiled core raises only these classes; anything else escaping
the core is a bug (the fuzz harness asserts it).
"""

from __future__ import annotations


class FastgwError(Exception):
    """Base of every error fastgw raises on purpose."""


class ProtocolError(FastgwError):
    """A peer broke HTTP/1.1. ``status`` is the answer to send (for a request) and
    ``close`` says whether framing is now in doubt, so the connection must be closed."""

    status: int = 400
    close: bool = True

    def __init__(self, detail: str, status: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if status is not None:
            self.status = status


class BadRequest(ProtocolError):
    """400: malformed request line, field, framing or chunk."""

    status = 400


class URITooLong(ProtocolError):
    """414: request target over the configured limit."""

    status = 414


class HeadTooLarge(ProtocolError):
    """431: header block over the size limit or over the field-count limit."""

    status = 431


class NotImplementedTE(ProtocolError):
    """501: a transfer coding other than a single final ``chunked``."""

    status = 501


class VersionNotSupported(ProtocolError):
    """505: an HTTP version other than 1.0 or 1.1."""

    status = 505


class BadResponse(ProtocolError):
    """An upstream answered with bytes that are not HTTP/1.1; the gateway answers 502."""

    status = 502


class ConfigError(FastgwError):
    """A configuration problem: names the file, the key path and what is wrong."""

    def __init__(self, problems: list[tuple[str, str, str]]) -> None:
        self.problems = problems
        super().__init__("\n".join(f"{f}: {k}: {msg}" for f, k, msg in problems))
