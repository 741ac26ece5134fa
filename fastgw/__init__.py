"""fastgw: an identity-aware API gateway for serverless function endpoints.

Public names only; see ``fastgw.gateway`` for the embeddable gateway and
``fastgw.config`` for configuration objects and loading.
"""

from fastgw._version import __version__
from fastgw.errors import ConfigError, FastgwError, ProtocolError
from fastgw.gateway import Gateway

__all__ = ["ConfigError", "FastgwError", "Gateway", "ProtocolError", "__version__"]
