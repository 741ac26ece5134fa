"""Type stubs for the compiled token-bucket core (fastgw/_core/bucket.pyx).

Every public name of the module, with the exact parameter names of the Cython signatures;
``stubtest`` keeps them honest (tests/core/test_bucket.py).
"""

from os import PathLike
from typing import Final, final

# Bounds on the arguments; a value outside them is a bug in the caller (ValueError).
MIN_RATE_PER_S: Final = 1e-6
MAX_RATE_PER_S: Final = 1e9
# Longest time an empty bucket may take to fill (burst / rate), 2**60 ns.
MAX_TAU_S: Final = 1152921504.606846976
MAX_KEY_BYTES: Final = 65535
MAX_KEYS_LIMIT: Final = 268435456
# Keys up to this length are stored in the table's slot itself.
INLINE_KEY_BYTES: Final = 40

@final
class BucketTable:
    """A table of GCRA token buckets keyed by bytes, at most ``max_keys`` of them."""

    def __init__(self, max_keys: int, path: str | PathLike[str] | None = None) -> None:
        """``path``: a shared table, mapped from that file (use tmpfs) by every process
        that opens it with the same ``max_keys``; its takes lock the table."""

    @property
    def max_keys(self) -> int: ...
    @property
    def path(self) -> str | None:
        """The file of a shared table, None for a private one."""

    def take(self, key: bytes, cost: int, now: float, rate_per_s: float, burst: float) -> float:
        """0.0 when ``cost`` tokens were taken at ``now`` (seconds); else the seconds to
        wait (nothing taken); ``inf`` when ``cost > burst``."""

    def peek(self, key: bytes, cost: int, now: float, rate_per_s: float, burst: float) -> float:
        """What ``take`` would answer; changes nothing."""

    def remaining(self, key: bytes, now: float, rate_per_s: float, burst: float) -> int:
        """Whole tokens ``key`` could take at ``now``; changes nothing."""

    def statistics(self) -> dict[str, int]:
        """keys, max_keys, allowed, limited, evictions, evictions_lossy, slots,
        memory_bytes."""

    def keys(self) -> list[bytes]: ...
    def __len__(self) -> int: ...
    def __contains__(self, key: object, /) -> bool: ...
