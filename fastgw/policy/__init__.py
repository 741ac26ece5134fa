"""Decisions: who may call what (``acl``)."""

from fastgw.policy.acl import Decision, RouteAuth, decide, route_auth

__all__ = ["Decision", "RouteAuth", "decide", "route_auth"]
