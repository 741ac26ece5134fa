"""Type stubs for fastgw/_core/shm.pyx: a file mapped MAP_SHARED by several processes
(the C side, the region pointer and the spinlock, is for core modules: shm.pxd)."""

from os import PathLike
from typing import Final, final

HEADER_BYTES: Final = 4096
FORMAT: Final = 1

@final
class SharedFile:
    @property
    def path(self) -> str: ...
    @property
    def fresh(self) -> bool: ...
    @property
    def size_bytes(self) -> int: ...
    @staticmethod
    def open(
        path: str | PathLike[str], size_bytes: int, magic: bytes, shape: bytes
    ) -> SharedFile: ...
    def publish(self) -> None: ...
