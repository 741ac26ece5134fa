"""A Google Cloud Function (HTTP signature) for the end-to-end credential test, run by
Google's functions-framework: it answers with the credential fields it received, so
the test can check what the gateway attached. Not a test module itself."""

import json

import flask


def echo_auth(request: flask.Request) -> flask.Response:
    seen = {
        name: request.headers.get(name)
        for name in ("Authorization", "X-Forwarded-Authorization", "X-Serverless-Authorization")
    }
    seen["path"] = request.full_path
    return flask.Response(json.dumps(seen), mimetype="application/json")
