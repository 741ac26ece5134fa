from collections.abc import Sequence
from typing import final

DEFAULT_BUCKETS_S: tuple[float, ...]

class Histogram:
    n: int
    sum: float
    count: int
    def __init__(self, bounds: Sequence[float] = ...) -> None: ...
    def observe(self, v: float) -> None: ...
    def bounds_list(self) -> list[float]: ...
    def snapshot(self) -> tuple[list[tuple[float, int]], float]: ...

AUDIT_FIELD_COUNT: int

def format_audit_lines(
    records: list[tuple[object, ...]], cache: dict[object, bytes], time_offset: float = ...
) -> bytes: ...

@final
class AuditRing:
    """Pending audit records in preallocated C memory; see metrics.pyx."""

    capacity: int
    dropped: int
    def __init__(self, capacity: int) -> None: ...
    def __len__(self) -> int: ...
    def add(
        self,
        time: float,
        request_id: bytes | None,
        client: bytes | None,
        route: str | None,
        backend: str | None,
        endpoint: str | None,
        status: int,
        decision: str | None,
        reason: str | None,
        identity: object,
        duration_s: float,
        upstream_first_byte_s: float | None,
        bytes_in: int | None,
        bytes_out: int | None,
        retries: int,
        traceparent: bytes | None,
        /,
    ) -> None: ...
    def drain_to_bytes(self, time_offset: float = ...) -> bytes: ...
    def name_count(self) -> int: ...
