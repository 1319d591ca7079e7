"""A real S3 protocol server on loopback for tests and benchmarks: moto's
``ThreadedMotoServer`` (as s3fs's own test suite uses it), with every HTTP request
recorded (method, path, range, bytes in and out), so tests can count what the real
s3fs client sent.

    with S3Server() as server:
        options = server.storage_options     # for vgs_ckpt and s3fs
        bucket = server.bucket()             # a fresh, empty bucket
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from moto.moto_server.threaded_moto_server import MotoRequestHandler, ThreadedMotoServer
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server

REGION = "eu-west-1"  # not us-east-1: s3fs sends a LocationConstraint when creating buckets
# No credentials or metadata lookups may leave the machine.
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request


@dataclass
class Request:
    method: str
    path: str
    query: str
    range: str | None
    received: int  # request body bytes (what the client sent)
    sent: int  # response body bytes (what the client got)
    copy_source: str | None = None  # a server-side copy (CopyObject)


class S3Server(ThreadedMotoServer):
    """moto's S3 on 127.0.0.1 (a free port), recording every request."""

    def __init__(self) -> None:
        super().__init__(ip_address="127.0.0.1", port=0, verbose=False)
        self.requests: list[Request] = []
        self._lock = threading.Lock()

    def _server_entry(self) -> None:
        app = DomainDispatcherApplication(create_backend_app)

        def counted(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
            record = Request(environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""),
                             environ.get("QUERY_STRING", ""), environ.get("HTTP_RANGE"),
                             int(environ.get("CONTENT_LENGTH") or 0), 0,
                             environ.get("HTTP_X_AMZ_COPY_SOURCE"))
            with self._lock:  # recorded on arrival; its bytes are counted before they
                self.requests.append(record)  # are sent, so a client never sees fewer
            body: Iterable[bytes] = app(environ, start_response)
            try:
                for chunk in body:
                    record.sent += len(chunk)
                    yield chunk
            finally:
                close = getattr(body, "close", None)
                if close is not None:
                    close()

        self._server = make_server(self._ip_address, self._port, counted, True,
                                   request_handler=MotoRequestHandler)
        self._server_ready_event.set()
        self._server.serve_forever()

    @property
    def endpoint(self) -> str:
        host, port = self.get_host_and_port()
        return f"http://{host}:{port}"

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options that reach this server (and nothing else)."""
        return {"key": "testing", "secret": "testing",
                "client_kwargs": {"endpoint_url": self.endpoint, "region_name": REGION},
                "use_listings_cache": False}

    def filesystem(self) -> Any:
        import s3fs
        return s3fs.S3FileSystem(**self.storage_options)

    def bucket(self, name: str | None = None) -> str:
        """Create a new bucket (a fresh name by default); its name."""
        name = name or f"t-{uuid.uuid4().hex[:12]}"
        self.filesystem().mkdir(name)
        return name

    def mark(self) -> int:
        """The number of requests so far (count what follows with :meth:`since`)."""
        with self._lock:
            return len(self.requests)

    def since(self, mark: int) -> list[Request]:
        with self._lock:
            return list(self.requests[mark:])

    def __enter__(self) -> S3Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
