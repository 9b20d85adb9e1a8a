"""A scripted OpenAI-compatible server on loopback for LLM tests (POST /v1/chat/completions).

Each request takes the next step of the script (the last one repeats). A step is a dict:
  {"content": "..."}            a normal answer
  {"status": 429}               an HTTP error (any status), JSON error body
  {"delay": 3.0, ...}           sleep before answering (to trigger client timeouts)
  {"raw": "not json"}           a malformed body with status 200
Requests are kept in `server.requests` for assertions.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class ScriptedLLM:
    def __init__(self, script: list[dict[str, Any]] | None = None) -> None:
        self.script: list[dict[str, Any]] = list(script or [{"content": "hello"}])
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._i = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                step = outer._next(body)
                if step.get("delay"):
                    time.sleep(float(step["delay"]))
                status = int(step.get("status", 200))
                if "raw" in step:
                    payload = str(step["raw"]).encode()
                elif status != 200:
                    payload = json.dumps({"error": {"message": f"scripted {status}", "type": "scripted",
                                                    "code": status}}).encode()
                else:
                    content = str(step.get("content", ""))
                    payload = json.dumps({
                        "id": "chatcmpl-scripted", "object": "chat.completion", "created": int(time.time()),
                        "model": body.get("model", "scripted"),
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                     "finish_reason": step.get("finish_reason", "stop")}],
                        "usage": {"prompt_tokens": 11, "completion_tokens": max(1, len(content) // 4),
                                  "total_tokens": 11 + max(1, len(content) // 4)},
                    }).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    if status == 429:
                        self.send_header("Retry-After", "0")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 256  # the default backlog of 5 refused a fleet's burst of calls

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def _next(self, body: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self.requests.append(body)
            step = self.script[min(self._i, len(self.script) - 1)]
            self._i += 1
            return step

    def set_script(self, script: list[dict[str, Any]]) -> None:
        with self._lock:
            self.script, self._i = list(script), 0

    def __enter__(self) -> ScriptedLLM:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
