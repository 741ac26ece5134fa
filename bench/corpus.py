"""The one corpus every micro benchmark parses: realistic messages, built once at import.

Each message is what the gateway sees on the wire for one exchange in its target use:
a browser calling an API with cookies, an API client with an RS256 bearer token and a
JSON body, a client streaming an upload with chunked framing, and the responses a
serverless function platform (Cloud Functions-like) sends back. The bytes are fixed
(no randomness), so runs compare like with like; sizes are asserted below so an edit
that makes a message unrealistically small or large fails loudly.

``Message.head`` is the head through its blank line; ``Message.body`` is the body as
framed on the wire (chunk-size lines included). ``expect`` holds what every parser must
agree on; the benchmarks check it once before timing, so a parser that silently fails
cannot win.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Message:
    name: str
    head: bytes
    body: bytes = b""
    # Parsed meaning all three parsers must agree on: method/target or status, the
    # field count, the framing and, for a Content-Length body, its length.
    expect: dict[str, object] = field(default_factory=dict)

    @property
    def wire(self) -> bytes:
        return self.head + self.body


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _crlf(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _chunked(*chunks: bytes) -> bytes:
    out = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)
    return out + b"0\r\n\r\n"


def _jwt() -> str:
    """An RS256 ID token shaped like Google's or Auth0's: kid header, the usual claims, a
    256-byte (RSA-2048) signature. The signature bytes are a deterministic stand-in: the
    parser benchmarks only move the string around, they never verify it."""
    header = {"alg": "RS256", "kid": "6f7254101f56e41cf35c9926de84a2d552b4c6f1", "typ": "JWT"}
    claims = {
        "iss": "https://accounts.google.com",
        "azp": "32555940559.apps.googleusercontent.com",
        "aud": "https://gw.example.com",
        "sub": "110248495921238986420",
        "email": "deployer@acme-prod.iam.gserviceaccount.com",
        "email_verified": True,
        "iat": 1764129600,
        "exp": 1764133200,
        "scope": "functions.invoke orders.write",
    }
    signature = b"".join(hashlib.sha256(b"fastgw-bench-%d" % i).digest() for i in range(8))
    signing_input = (
        _b64url(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + _b64url(json.dumps(claims, separators=(",", ":")).encode())
    )
    return signing_input + "." + _b64url(signature)


JWT = _jwt()

# ---------------------------------------------------------------------------------------
# Requests

GET_BROWSER = Message(
    "get_browser",
    _crlf(
        "GET /api/v1/orders?status=open&limit=20 HTTP/1.1",
        "Host: api.example.com",
        "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
        "Accept: application/json, text/plain, */*",
        "Accept-Language: en-US,en;q=0.9",
        "Accept-Encoding: gzip, deflate, br, zstd",
        "Referer: https://app.example.com/orders",
        "Origin: https://app.example.com",
        "Sec-Fetch-Dest: empty",
        "Sec-Fetch-Mode: cors",
        "Sec-Fetch-Site: same-site",
        "Connection: keep-alive",
        "Cookie: _ga=GA1.1.1402914133.1764120000; sid=s%3Aq8Xv2mB7nWc0LrT5; "
        "csrftoken=Zk3fQ9vPz1LmN0rS7tUwXy4A",
    ),
    expect={
        "method": b"GET",
        "target": b"/api/v1/orders?status=open&limit=20",
        "fields": 12,
        "framing": "none",
    },
)

_API_BODY = json.dumps(
    {
        "order_id": "ord_01JDQ8Z6X4K2M9",
        "items": [{"sku": "SKU-1042", "qty": 2}, {"sku": "SKU-2210", "qty": 1}],
        "currency": "EUR",
        "notify": True,
    },
    separators=(",", ":"),
).encode()

POST_API_JWT = Message(
    "post_api_jwt",
    _crlf(
        "POST /v1/functions/orders-create:invoke HTTP/1.1",
        "Host: gw.example.com",
        "Authorization: Bearer " + JWT,
        "Content-Type: application/json",
        "Accept: application/json",
        "Accept-Encoding: gzip, deflate",
        "User-Agent: python-httpx/0.27.2",
        "X-Request-Id: 4d1f7c2a-9b3e-4f60-8a21-6c5d0e9f7b13",
        f"Content-Length: {len(_API_BODY)}",
    ),
    _API_BODY,
    expect={
        "method": b"POST",
        "target": b"/v1/functions/orders-create:invoke",
        "fields": 8,
        "framing": "length",
        "length": len(_API_BODY),
    },
)

_NDJSON = [
    b"".join(
        b'{"ts":%d,"device":"sensor-%03d","temp_c":%d.%d,"ok":true}\n'
        % (1764129600 + i, (i * 7 + k) % 1000, 18 + i % 9, k % 10)
        for i in range(6)
    )
    for k in range(3)
]

POST_CHUNKED_UPLOAD = Message(
    "post_chunked_upload",
    _crlf(
        "POST /v1/functions/ingest:invoke HTTP/1.1",
        "Host: gw.example.com",
        "User-Agent: curl/8.5.0",
        "Accept: */*",
        "X-Api-Key: fgw_live_7Qm2ZpX9vKc4RtB8nL1sWd6Y",
        "Content-Type: application/x-ndjson",
        "Transfer-Encoding: chunked",
    ),
    _chunked(*_NDJSON),
    expect={
        "method": b"POST",
        "target": b"/v1/functions/ingest:invoke",
        "fields": 6,
        "framing": "chunked",
    },
)

REQUESTS = (GET_BROWSER, POST_API_JWT, POST_CHUNKED_UPLOAD)

# ---------------------------------------------------------------------------------------
# Responses (from the function platform back through the gateway)

_FN_BODY = json.dumps(
    {"order_id": "ord_01JDQ8Z6X4K2M9", "status": "created", "total": "48.90", "eta_days": 2},
    separators=(",", ":"),
).encode()

FN_JSON_200 = Message(
    "fn_json_200",
    _crlf(
        "HTTP/1.1 200 OK",
        "Content-Type: application/json",
        "X-Cloud-Trace-Context: 4bf92f3577b34da6a3ce929d0e0e4736;o=1",
        "Function-Execution-Id: 7kxm3q2d9p1n",
        "Date: Wed, 26 Nov 2025 04:07:12 GMT",
        "Server: Google Frontend",
        "Cache-Control: private",
        'Alt-Svc: h3=":443"; ma=2592000,h3-29=":443"; ma=2592000',
        f"Content-Length: {len(_FN_BODY)}",
    ),
    _FN_BODY,
    expect={"status": 200, "fields": 8, "framing": "length", "length": len(_FN_BODY)},
)

FN_CHUNKED_200 = Message(
    "fn_chunked_200",
    _crlf(
        "HTTP/1.1 200 OK",
        "Content-Type: application/x-ndjson",
        "X-Cloud-Trace-Context: 0af7651916cd43dd8448eb211c80319c;o=1",
        "Function-Execution-Id: q2v8c0z5m1rt",
        "Date: Wed, 26 Nov 2025 04:07:13 GMT",
        "Server: Google Frontend",
        "Transfer-Encoding: chunked",
    ),
    _chunked(*_NDJSON),
    expect={"status": 200, "fields": 6, "framing": "chunked"},
)

FN_204 = Message(
    "fn_204",
    _crlf(
        "HTTP/1.1 204 No Content",
        "X-Cloud-Trace-Context: 5c2e8f41a09b4d7e9f3a6b1c2d4e5f60;o=1",
        "Function-Execution-Id: b7n4k1x9w3ds",
        "Date: Wed, 26 Nov 2025 04:07:14 GMT",
        "Server: Google Frontend",
    ),
    expect={"status": 204, "fields": 4, "framing": "none"},
)

RESPONSES = (FN_JSON_200, FN_CHUNKED_200, FN_204)

# The request each response answers: h11's client role must have sent it first.
REQUEST_FOR = {
    FN_JSON_200.name: POST_API_JWT,
    FN_CHUNKED_200.name: GET_BROWSER,
    FN_204.name: GET_BROWSER,
}

# ---------------------------------------------------------------------------------------
# A 64 KiB chunked body: 16 chunks of 4 KiB, the size a function streaming a file or a
# client uploading one typically writes per chunk.

CHUNKED_64K_DATA = bytes(range(256)) * 256
CHUNKED_64K = _chunked(*(CHUNKED_64K_DATA[i : i + 4096] for i in range(0, 65536, 4096)))

# Sizes the brief asks for; keep the corpus honest when it is edited.
assert 450 <= len(GET_BROWSER.head) <= 650, len(GET_BROWSER.head)
assert 750 <= len(JWT) <= 850, len(JWT)
assert len(CHUNKED_64K_DATA) == 65536
