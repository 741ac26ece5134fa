"""Type stubs for the compiled HTTP/1.1 core (fastgw/_core/http.pyx).

Every public name of the module, with the exact parameter names, defaults and keyword-only
markers of the Cython signatures; ``stubtest`` keeps them honest.
"""

from collections.abc import Iterable
from typing import Final, TypeVar, final, overload

from typing_extensions import Buffer, disjoint_base

_T = TypeVar("_T")

BODY_NONE: Final = 0
BODY_LENGTH: Final = 1
BODY_CHUNKED: Final = 2
BODY_UNTIL_CLOSE: Final = 3

# Upper bound of ``max_fields`` (it sizes a stack array in the core).
MAX_FIELDS_LIMIT: Final = 256

@disjoint_base
class Head:
    """Common part of a parsed head. Made only by the parse functions."""

    @property
    def raw(self) -> bytes: ...
    @property
    def version(self) -> int:
        """10 or 11."""

    @property
    def http_version(self) -> bytes:
        """b"1.0" or b"1.1"."""

    @property
    def keep_alive(self) -> bool: ...
    @property
    def body_kind(self) -> int:
        """One of the BODY_* constants."""

    @property
    def content_length(self) -> int:
        """Meaningful when ``body_kind == BODY_LENGTH``; 0 otherwise."""

    @property
    def head_len(self) -> int:
        """Bytes the head took from ``start`` (leading empty lines included)."""

    @property
    def upgrade(self) -> bool: ...
    @property
    def headers(self) -> list[tuple[bytes, bytes]]: ...
    def __len__(self) -> int: ...
    @overload
    def get(self, name: bytes) -> bytes | None: ...
    @overload
    def get(self, name: bytes, default: _T) -> bytes | _T: ...
    def get_all(self, name: bytes) -> list[bytes]: ...
    def __contains__(self, name: bytes, /) -> bool: ...

@final
class RequestHead(Head):
    @property
    def method(self) -> bytes: ...
    @property
    def target(self) -> bytes: ...
    @property
    def expect_continue(self) -> bool: ...
    @property
    def absolute_form(self) -> bool: ...
    @property
    def host(self) -> bytes | None:
        """The authority: an absolute-form target's, else the Host field's."""

    @property
    def path(self) -> bytes:
        """The origin-form of the target (path and query)."""

@final
class ResponseHead(Head):
    @property
    def status(self) -> int: ...
    @property
    def reason(self) -> bytes: ...

def parse_request_head(
    buf: Buffer,
    start: int = 0,
    *,
    scan_from: int = 0,
    max_head_bytes: int = 32768,
    max_fields: int = 100,
    max_target: int = 8192,
) -> RequestHead | None: ...
def parse_response_head(
    buf: Buffer,
    start: int = 0,
    *,
    request_was_head: bool = False,
    scan_from: int = 0,
    max_head_bytes: int = 65536,
    max_fields: int = 100,
) -> ResponseHead | None: ...

@disjoint_base
class StripSet:
    def __init__(self, names: Iterable[bytes] = (), prefixes: Iterable[bytes] = ()) -> None: ...

def build_request_head(
    h: RequestHead,
    *,
    target: bytes | None = None,
    host: bytes,
    client_ip: bytes | None = None,
    proto: bytes | None = None,
    request_id: bytes | None = None,
    xff_append: bool = True,
    via: bytes | None = None,
    extra: bytes | None = None,
    strip: StripSet | None = None,
    method: bytes | None = None,
) -> bytes: ...
def build_response_head(
    h: ResponseHead,
    *,
    body_kind: int = -1,
    close: bool = False,
    keep_alive_10: bool = False,
    extra: bytes | None = None,
    strip: StripSet | None = None,
    via: bytes | None = None,
) -> bytes: ...

@final
class ChunkedReader:
    def __init__(
        self, *, max_line: int = 4096, max_trailer_bytes: int = 32768, response: bool = False
    ) -> None: ...
    @property
    def max_line(self) -> int: ...
    @property
    def max_trailer_bytes(self) -> int: ...
    @property
    def body_bytes(self) -> int: ...
    @property
    def done(self) -> bool: ...
    def scan(self, buf: Buffer, start: int = 0, end: int = -1) -> int: ...
    def decode(self, buf: Buffer, start: int = 0, end: int = -1) -> tuple[int, list[bytes]]: ...
