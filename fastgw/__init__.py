"""fastgw: an identity-aware API gateway for serverless function endpoints.

Public names only; see ``fastgw.gateway`` for the embeddable gateway and
``fastgw.config`` for configuration objects and loading. ``Gateway`` is imported on
first use, so ``fastgw check`` and ``fastgw --version`` do not load trio.
"""

from typing import TYPE_CHECKING, Any

from fastgw._version import __version__
from fastgw.errors import ConfigError, FastgwError, ProtocolError

if TYPE_CHECKING:
    from fastgw.gateway import Gateway

__all__ = ["ConfigError", "FastgwError", "Gateway", "ProtocolError", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Gateway":
        from fastgw.gateway import Gateway

        return Gateway
    raise AttributeError(f"module 'fastgw' has no attribute {name!r}")
