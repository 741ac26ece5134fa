"""Who may call what: policies compiled per route, decided per request.

A route guarded by policies needs an identity (a verified JWT, an API key, an mTLS
client certificate; anonymous only where every enforcing policy allows it). Each
enforcing policy must allow the request (they combine with AND); within a policy the
rules are tried in order and the first that matches decides, and a policy none of whose
rules matches denies ("default deny"). Shadow policies are evaluated and counted as
would-allow / would-deny but never change the answer. Policies apply only in the
environments they name (all when they name none).

Every decision comes with a reason a person can read back: ``policy:rule N (allow)``,
``policy:rule N (deny)``, ``policy:no rule matched``; ``fastgw explain`` prints the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastgw.config.model import ClaimCondition, PolicyConfig, PolicyRule

if TYPE_CHECKING:
    from fastgw.identity import Identity


def claim_value(claims: Mapping[str, Any], path: str) -> Any:
    """A claim by dotted path (``realm_access.roles``); None when absent."""
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _as_list(value: Any) -> list[Any] | None:
    if isinstance(value, list):
        return value
    if isinstance(value, str):  # "scope": a space-separated string (RFC 8693 4.2)
        return value.split()
    return None


def condition_holds(cond: ClaimCondition, claims: Mapping[str, Any]) -> bool:
    value = claim_value(claims, cond.claim)
    op = cond.op
    if op == "present":
        return value is not None
    if value is None:
        return False
    if op == "equals":
        return bool(value == cond.value)
    if op == "one_of":
        return value in cond.value
    items = _as_list(value)
    if items is None:
        return False
    if op == "contains":
        return cond.value in items
    if op == "all_of":
        return all(v in items for v in cond.value)
    return False


def rule_matches(rule: PolicyRule, identity: Identity, issuer_name: str | None) -> bool:
    if rule.kinds and identity.kind not in rule.kinds:
        return False
    if rule.issuers and issuer_name not in rule.issuers:
        return False
    if rule.subjects and identity.subject not in rule.subjects:
        return False
    if rule.key_attributes:
        if identity.kind != "apikey":
            return False
        for k, v in rule.key_attributes:
            if identity.claims.get(k) != v:
                return False
    if rule.cert_sans:
        if identity.kind != "mtls":
            return False
        names: set[str] = set()
        for field in ("dns", "uri", "email"):
            names.update(identity.claims.get(field) or ())
        if not names.intersection(rule.cert_sans):
            return False
    return all(condition_holds(c, identity.claims) for c in rule.claims)


@dataclass(frozen=True, slots=True)
class Decision:
    allow: bool
    policy: str
    reason: str


def decide(policy: PolicyConfig, identity: Identity, issuer_name: str | None) -> Decision:
    for i, rule in enumerate(policy.rules):
        if rule_matches(rule, identity, issuer_name):
            allow = rule.effect == "allow"
            return Decision(allow, policy.name, f"{policy.name}:rule {i} ({rule.effect})")
    return Decision(False, policy.name, f"{policy.name}:no rule matched")


class RouteAuth:
    """The policies guarding one route in the running environment."""

    __slots__ = ("_cache", "allow_anonymous", "allow_reason", "enforce", "enforce_names", "shadow")

    def __init__(self, policies: list[PolicyConfig]) -> None:
        self.enforce = [p for p in policies if p.mode == "enforce"]
        self.shadow = [p for p in policies if p.mode == "shadow"]
        self.enforce_names = tuple(p.name for p in self.enforce)
        self.allow_reason = ",".join(self.enforce_names) or None
        # No credential at all is acceptable only if every enforcing policy says so.
        self.allow_anonymous = all(p.allow_anonymous for p in self.enforce)
        # Decisions by identity object: rules look at the identity only, and a cached
        # token yields the same object. Bounded; rebuilt with the config on reload.
        self._cache: dict[Identity, tuple[Decision | None, list[Decision]]] = {}

    def evaluate_cached(
        self, identity: Identity, issuer_name: str | None
    ) -> tuple[Decision | None, list[Decision]]:
        hit = self._cache.get(identity)
        if hit is None:
            hit = self.evaluate(identity, issuer_name)
            if len(self._cache) >= 10000:
                self._cache.clear()
            self._cache[identity] = hit
        return hit

    def evaluate(
        self, identity: Identity, issuer_name: str | None
    ) -> tuple[Decision | None, list[Decision]]:
        """(the first enforcing denial or None when all allow, shadow decisions)."""
        denied = None
        for p in self.enforce:
            d = decide(p, identity, issuer_name)
            if not d.allow:
                denied = d
                break
        shadows = [decide(p, identity, issuer_name) for p in self.shadow]
        return denied, shadows


def route_auth(
    policies: tuple[PolicyConfig, ...], route: str, environment: str
) -> RouteAuth | None:
    mine = [
        p
        for p in policies
        if route in p.routes and (not p.environments or environment in p.environments)
    ]
    return RouteAuth(mine) if mine else None
