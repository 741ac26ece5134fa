"""Type stubs for the compiled map-matching core (fastgw/_core/acl.pyx).

Every public name of the module, with the exact parameter names, defaults and keyword-only
markers of the Cython signatures; ``stubtest`` keeps them honest.
"""

import os
from collections.abc import Iterable
from typing import Final, final

# The match types, as HAProxy names them (``-m str`` ... ``-m ip``).
KINDS: Final[tuple[str, ...]]

@final
class Map:
    """An immutable map of one match type; a reload builds a new one and swaps it."""

    def __init__(
        self,
        kind: str,
        entries: Iterable[tuple[bytes, bytes]],
        *,
        ignore_case: bool = False,
        source: str = "<entries>",
    ) -> None: ...
    def lookup(self, key: bytes) -> bytes | None:
        """The winning entry's value, or None."""

    def lookup_index(self, key: bytes) -> int:
        """The winning entry's index in file order, or -1."""

    def entry(self, index: int) -> tuple[bytes, bytes]: ...
    def location(self, index: int) -> tuple[str, str]:
        """(source, "line N") for a map file, (source, "entries[i]") otherwise."""

    @property
    def kind(self) -> str: ...
    @property
    def ignore_case(self) -> bool: ...
    @property
    def source(self) -> str: ...
    def __len__(self) -> int: ...

def parse_map(
    data: bytes, kind: str, *, ignore_case: bool = False, source: str = "<map>"
) -> Map: ...
def load_map_file(
    path: str | bytes | os.PathLike[str] | os.PathLike[bytes],
    kind: str,
    ignore_case: bool = False,
) -> Map: ...
