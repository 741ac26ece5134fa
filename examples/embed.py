"""Embed fastgw in a trio program: a gateway built from config objects, served in your
own nursery, one request through it, then cancelled.

Run it with ``python examples/embed.py``. It starts fastgw's small demo function as the
upstream, so it needs nothing else; point the backend's endpoint at your own function
instead. tests/e2e/test_embed.py runs this file and checks what it prints.
"""

import json

import trio

from fastgw import Gateway
from fastgw.config import BackendConfig, GatewayConfig, ListenerConfig, RouteConfig, parse_endpoint
from fastgw.demo import serve_demo_function


async def main() -> None:
    async with trio.open_nursery() as nursery:
        # The upstream: the demo function on a free port of 127.0.0.1.
        _, fn_port = await nursery.start(serve_demo_function)

        config = GatewayConfig(
            listeners=(ListenerConfig(name="main", host="127.0.0.1", port=0),),
            backends={
                "fn": BackendConfig(
                    name="fn", endpoints=(parse_endpoint(f"http://127.0.0.1:{fn_port}"),)
                )
            },
            routes=(RouteConfig(name="api", backend="fn", path_prefix="/api", strip_prefix=True),),
        )
        gw = Gateway(config)
        addrs = await nursery.start(gw.serve)  # [(host, port)], one per listener
        host, port = addrs[0]
        print(f"gateway on http://{host}:{port}")

        # One request through the gateway: POST /api/hello -> the function's /hello.
        body = b'{"name": "embedder"}'
        async with await trio.open_tcp_stream(host, port) as stream:
            await stream.send_all(
                b"POST /api/hello HTTP/1.1\r\nHost: example\r\nConnection: close\r\n"
                b"Content-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            response = b""
            while data := await stream.receive_some(65536):
                response += data
        head, _, payload = response.partition(b"\r\n\r\n")
        print(head.split(b"\r\n")[0].decode())
        answer = json.loads(payload)
        print(answer["greeting"])
        print(f"function saw path={answer['path']} via={answer['headers']['via']}")

        nursery.cancel_scope.cancel()  # stops the gateway and the demo function


if __name__ == "__main__":
    trio.run(main)
