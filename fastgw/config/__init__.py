"""Configuration: load and validate TOML (or a dict) into frozen config objects.

Public names only; the work is in ``loader`` (reading, includes, validation) and ``model``
(the objects).
"""

from fastgw.config.loader import config_from_dict, load_config, parse_address, parse_endpoint
from fastgw.config.model import (
    BackendConfig,
    Endpoint,
    GatewayConfig,
    Limits,
    ListenerConfig,
    RouteConfig,
)
from fastgw.errors import ConfigError

__all__ = [
    "BackendConfig",
    "ConfigError",
    "Endpoint",
    "GatewayConfig",
    "Limits",
    "ListenerConfig",
    "RouteConfig",
    "config_from_dict",
    "load_config",
    "parse_address",
    "parse_endpoint",
]
