"""``fastgw explain`` and ``fastgw who-can``: the gateway's decisions, read back offline.

Both work from the configuration alone (no keys are fetched, no upstream is called).
``explain`` builds the request the way the gateway would see it, runs the same router,
decodes a bearer token *without verifying it* (and says so), looks an API key up the way
the gateway does, and walks each policy rule, saying for every rule why it does or does
not match. ``who-can`` lists, for the route a request would take, what each allowing
rule asks for, and the configured API keys that satisfy it.
"""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import urlsplit

import jwt as pyjwt

from fastgw._core.http import parse_request_head
from fastgw.config.model import ClaimCondition, GatewayConfig, PolicyRule
from fastgw.errors import ProtocolError
from fastgw.identity import ANONYMOUS, Identity, bearer_token
from fastgw.policy.acl import claim_value, condition_holds, rule_matches


def _request(method: str, url: str, headers: list[str]) -> bytes:
    u = urlsplit(url if "://" in url else "http://gateway" + url)
    target = (u.path or "/") + (f"?{u.query}" if u.query else "")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {u.netloc or 'gateway'}"]
    lines += [h.strip() for h in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _cond_text(c: ClaimCondition) -> str:
    if c.op == "present":
        return f"claim {c.claim} present"
    return f"claim {c.claim} {c.op.replace('_', ' ')} {json.dumps(c.value, default=list)}"


def _why_not(rule: PolicyRule, ident: Identity, issuer_name: str | None) -> str | None:
    """The first condition of ``rule`` that fails for ``ident``, in words; None if all hold."""
    if rule.kinds and ident.kind not in rule.kinds:
        return f"identity kind {ident.kind} is not one of {list(rule.kinds)}"
    if rule.issuers and issuer_name not in rule.issuers:
        return f"issuer {issuer_name or '(none)'} is not one of {list(rule.issuers)}"
    if rule.subjects and ident.subject not in rule.subjects:
        return f"subject {ident.subject!r} is not one of {list(rule.subjects)}"
    if rule.key_attributes:
        if ident.kind != "apikey":
            return "needs an API key"
        for k, v in rule.key_attributes:
            if ident.claims.get(k) != v:
                return f"API key attribute {k} is {ident.claims.get(k)!r}, not {v!r}"
    if rule.cert_sans and ident.kind != "mtls":
        return "needs a client certificate"
    for c in rule.claims:
        if not condition_holds(c, ident.claims):
            return f"{_cond_text(c)}: no (value {json.dumps(claim_value(ident.claims, c.claim))})"
    if not rule_matches(rule, ident, issuer_name):
        return "certificate names do not match"
    return None


def explain(
    config: GatewayConfig, method: str, url: str, headers: list[str]
) -> tuple[bool, list[str]]:
    """(would be allowed, lines to print)."""
    from fastgw.gateway import GatewayState

    out: list[str] = []
    raw = _request(method, url, headers)
    try:
        head = parse_request_head(raw)
    except ProtocolError as e:
        return False, [f"request: rejected by the parser with {e.status}: {e.detail}"]
    assert head is not None
    state = GatewayState(config)
    host = head.host.decode() if head.host else "-"
    out.append(f"request: {method} {head.target.decode()} (host {host})")
    out.append(f"environment: {state.environment}")
    matched = state.router.match(head)
    if matched is None:
        out.append("route: none matches: 404 no_route")
        return False, out
    route, backend, path = matched
    out.append(f"route: {route.name} -> backend {backend.name}, upstream path {path.decode()}")

    ident: Identity | None = None
    issuer_name = None
    ident_cfg = config.identity
    try:
        token = bearer_token(head.get(b"authorization"))
    except Exception as e:  # AuthError: malformed Authorization
        out.append(f"identity: 400 {e}")
        return False, out
    if token is not None:
        try:
            claims = pyjwt.decode(token, options={"verify_signature": False})
            header = pyjwt.get_unverified_header(token)
        except pyjwt.PyJWTError as e:
            out.append(f"identity: bearer token is malformed ({e}): 401 invalid_token")
            return False, out
        iss = claims.get("iss")
        issuer_name = next((i.name for i in ident_cfg.issuers if i.issuer == iss), None)
        exp = claims.get("exp")
        when = "no exp" if exp is None else (
            "expired" if exp < time.time() else f"expires in {int(exp - time.time())} s"
        )  # fmt: skip
        out.append(
            f"identity: bearer token, UNVERIFIED (offline: signature not checked), "
            f"iss {iss!r} -> issuer {issuer_name or '(unknown: 401 invalid_token)'}, "
            f"sub {claims.get('sub')!r}, alg {header.get('alg')}, kid {header.get('kid')}, {when}"
        )
        if issuer_name is None:
            return False, out
        issuer = next(i for i in ident_cfg.issuers if i.name == issuer_name)
        if header.get("alg") not in issuer.algorithms:
            out.append(
                f"identity: alg {header.get('alg')} is not allowed for issuer {issuer_name} "
                f"({', '.join(issuer.algorithms)}): 401 invalid_token"
            )
            return False, out
        if exp is not None and exp < time.time():
            out.append("identity: the token has expired: 401 invalid_token")
            return False, out
        ident = Identity("jwt", str(claims.get("sub", "")), iss, claims, header.get("kid"))
    elif ident_cfg.api_keys is not None and head.get(ident_cfg.api_keys.header_name) is not None:
        ident = ident_cfg.api_keys.lookup(head.get(ident_cfg.api_keys.header_name))
        if ident is None:
            out.append("identity: API key not recognised: 401 invalid_token")
            return False, out
        out.append(f"identity: API key {ident.subject!r}, attributes {dict(ident.claims)}")
    else:
        out.append("identity: no credentials")

    auth = route.auth
    if auth is None:
        out.append("policies: none guard this route: allowed")
        allowed = True
    else:
        if ident is None:
            if not auth.allow_anonymous:
                out.append("policies: credentials required: 401 with a Bearer challenge")
                return False, out
            ident = ANONYMOUS
        allowed = True
        for p in auth.enforce + auth.shadow:
            out.append(f"policy {p.name} ({p.mode}):")
            decided = None
            for i, rule in enumerate(p.rules):
                why = _why_not(rule, ident, issuer_name)
                if why is None and decided is None:
                    decided = rule.effect
                    out.append(f"  rule {i} ({rule.effect}): matches -> {rule.effect}")
                elif decided is None:
                    out.append(f"  rule {i} ({rule.effect}): no: {why}")
                else:
                    out.append(f"  rule {i} ({rule.effect}): not reached")
            if decided is None:
                decided = "deny"
                out.append("  no rule matched -> deny")
            if p.mode == "enforce" and decided == "deny":
                allowed = False
        out.append("decision: " + ("allowed" if allowed else "403 forbidden"))
    for lim in route.limits:
        quota = f"{lim.rate:g}/s, burst {lim.burst:g}"
        if lim.tiered:
            tier = lim.tier_for(ident)
            quota = (
                f"tier {tier.name} ({lim.tier_claim}): {tier.rate:g}/s, burst {tier.burst:g}"
                if tier is not None
                else f"no tier ({lim.tier_claim}) and no default tier: 403 no_tier"
            )
        out.append(
            f"rate limit {lim.name}: {quota}, "
            f"key {lim.kind}{':' + lim.arg.decode() if lim.arg else ''}"
            + (" (shadow)" if lim.shadow else "")
        )
    return allowed, out


def _rule_text(rule: PolicyRule, config: GatewayConfig) -> str:
    parts: list[str] = []
    if rule.kinds:
        parts.append("identity kind " + " or ".join(rule.kinds))
    if rule.issuers:
        iss = {i.name: i.issuer for i in config.identity.issuers}
        parts.append("tokens from " + " or ".join(f"{n} ({iss.get(n, '?')})" for n in rule.issuers))
    if rule.subjects:
        parts.append("subject " + " or ".join(rule.subjects))
    parts += [_cond_text(c) for c in rule.claims]
    if rule.key_attributes:
        parts.append("API keys with " + ", ".join(f"{k}={v}" for k, v in rule.key_attributes))
    if rule.cert_sans:
        parts.append("client certificates naming " + " or ".join(rule.cert_sans))
    return " and ".join(parts) if parts else "anyone authenticated"


def who_can(config: GatewayConfig, method: str, url: str) -> list[str]:
    from fastgw.gateway import GatewayState

    head = parse_request_head(_request(method, url, []))
    assert head is not None
    state = GatewayState(config)
    matched = state.router.match(head)
    if matched is None:
        return [f"{method} {url}: no route matches (404)"]
    route = matched[0]
    out = [f"{method} {url} -> route {route.name}"]
    auth = route.auth
    if auth is None:
        return [*out, "anyone: no policy guards this route"]
    if auth.allow_anonymous:
        out.append("anonymous callers are let through to the rules")
    keys: Any = config.identity.api_keys
    for p in auth.enforce:
        out.append(f"policy {p.name} (first matching rule decides; otherwise denied):")
        for i, rule in enumerate(p.rules):
            out.append(f"  rule {i}: {rule.effect}: {_rule_text(rule, config)}")
            if rule.effect == "allow" and rule.key_attributes and keys is not None:
                names = sorted({
                    k.subject for k in keys.identities()
                    if all(k.claims.get(a) == v for a, v in rule.key_attributes)
                })  # fmt: skip
                if names:
                    out.append(f"    API keys: {', '.join(names)}")
    for p in auth.shadow:
        out.append(f"policy {p.name} is in shadow mode: evaluated, not enforced")
    return out
