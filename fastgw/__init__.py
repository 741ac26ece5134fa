"""fastgw: an identity-aware API gateway for serverless function endpoints."""

from fastgw._version import __version__

__all__ = ["__version__"]
