#!/usr/bin/env python3
"""moto's S3 server, handling one request at a time.

moto checks a PUT's If-None-Match / If-Match and then stores the object
without holding a lock, so on its threaded server two concurrent conditional
PUTs can both succeed (seen here: two winners among 32 `If-None-Match: *`
creates). S3 and Tigris evaluate the condition atomically; serving one
request at a time gives moto the same semantics for our tests.

Usage: moto-s3-server.py HOST PORT   (run with the virtualenv's python)
"""
import sys

from werkzeug.serving import run_simple

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)


class OneAtATime(MotoRequestHandler):
    # Close the connection after each response: with one thread, an idle
    # kept-alive connection would block every other client.
    protocol_version = "HTTP/1.0"


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    app = DomainDispatcherApplication(create_backend_app)
    run_simple(host, port, app, threaded=False, request_handler=OneAtATime)


if __name__ == "__main__":
    main()
