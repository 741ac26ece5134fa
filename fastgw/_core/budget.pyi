"""Type stubs for the compiled budget core (fastgw/_core/budget.pyx).

Every public name of the module, with the exact parameter names of the Cython signatures;
``stubtest`` keeps them honest (tests/core/test_budget.py).
"""

from typing import Final, final

MAX_KEY_BYTES: Final = 65535
MAX_KEYS_LIMIT: Final = 268435456
# Keys up to this length are stored in the slot itself, longer ones as a 128-bit digest.
INLINE_KEY_BYTES: Final = 32
# Slots per set (the unit of eviction and of locking).
WAYS: Final = 8
FILE_VERSION: Final = 1
FILE_MAGIC: Final = 0x5447445542574746

@final
class BudgetTable:
    """Budget counters keyed by bytes, at most ``max_keys`` of them; in a file shared by
    processes when ``path`` is given."""

    def __init__(self, max_keys: int, path: str | None = None) -> None: ...
    @property
    def max_keys(self) -> int: ...
    @property
    def path(self) -> str | None:
        """The file, or None for anonymous memory."""

    @property
    def loaded(self) -> bool:
        """True when counters were read from an existing file."""

    @property
    def reset_reason(self) -> str | None:
        """Why an existing file was replaced by an empty one, or None."""

    def spend(self, key: bytes, cost: int, window: int, limit: int) -> int:
        """What is left after spending ``cost`` in ``window``, or -1 (nothing spent)
        when ``cost`` is more than what is left."""

    def remaining(self, key: bytes, window: int, limit: int) -> int:
        """What ``key`` may still spend in ``window``; changes nothing."""

    def refund(self, key: bytes, cost: int, window: int) -> None:
        """Give back ``cost`` units spent in ``window`` (never below zero)."""

    def statistics(self) -> dict[str, int]:
        """keys, max_keys, slots, allowed, refused, evictions, file_bytes."""

    def __len__(self) -> int: ...
