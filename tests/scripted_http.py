"""A JSON HTTP server on loopback that answers from a queue: (status, body), or ("stall", seconds) to
hang up after a wait. It records every request. The API tests script real failures with it."""
from __future__ import annotations

import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class ScriptedHTTP:
    def __init__(self, when_empty: tuple[int, Any] = (404, {"error": {"message": "nothing queued"}})):
        self.replies: deque = deque()
        self.requests: list[dict[str, Any]] = []
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                scripted.requests.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                          "body": json.loads(raw) if raw else None})
                status, body = scripted.replies.popleft() if scripted.replies else when_empty
                if status == "stall":
                    time.sleep(body)
                    return
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _reply

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
