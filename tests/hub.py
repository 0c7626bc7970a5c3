"""A model hub or mirror on loopback for the tests: URL path -> bytes, over real HTTP.

The public hubs can't be reached from the machines this project is tested on; the builder's real fetch code
talks to this instead, with the hubs' URL shapes.
"""

from __future__ import annotations

import base64
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Hub:
    """Serves `files`. `credentials` (user, password): Basic auth demanded, a request without it refused (401,
    counted). `short`: half the body under the full Content-Length, a connection that breaks off."""

    def __init__(self, files: dict[str, bytes], *, credentials: tuple[str, str] | None = None,
                 short: bool = False) -> None:
        self.files, self.credentials = files, credentials
        self.served, self.refused = 0, 0
        self.requests: list[str] = []
        token = base64.b64encode(":".join(credentials).encode()).decode() if credentials else None
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hub.requests.append(self.path)
                if token and self.headers.get("Authorization") != f"Basic {token}":
                    hub.refused += 1
                    self.send_error(401)
                    return
                data = hub.files.get(self.path.split("?", 1)[0])
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                body = data[: len(data) // 2] if short else data
                self.wfile.write(body)
                hub.served += len(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @property
    def mirror(self) -> str:
        """The base URL with the credentials in it, as a user would write a mirror."""
        user, password = self.credentials or ("", "")
        return self.base.replace("http://", f"http://{user}:{password}@") if self.credentials else self.base

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> Hub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
