"""A local stand-in for an OpenAI-compatible chat endpoint, for tests (and the demo).

It speaks ``POST /v1/chat/completions`` on 127.0.0.1 (a free port), in a background thread,
and answers from a script, so tests can drive a client through every path it must survive::

    from llm_stub_server import StubChatServer, Reply

    with StubChatServer(responder=lambda request: Reply.ok("[]")) as server:
        server.push(Reply.error(429, retry_after="0.1"), Reply.slow(2.0))  # served first, in order
        client = HTTPChatLLM(server.url, "stub-model", timeout=0.5, backoff=0.01)
        ...
        assert server.request_count == 3

``Reply.ok(text)``          200 with ``text`` as the assistant message and a ``usage`` block
``Reply.error(status)``     an error status (429, 500, 401, ...), optional ``Retry-After``
``Reply.slow(seconds)``     waits before answering (the client should time out first)
``Reply.garbage()``         200 whose body is not JSON
``Reply.redirect(url)``     302 (or ``status``) with ``Location: url``

Queued replies (``push``) are used first; then ``responder(request_json) -> Reply``.
The default responder, :func:`qa_responder`, writes a JSON list of question-answer pairs
about the actors listed in the prompt (lines ``- NAME: DESCRIPTION``), so the QA generator
has something real to parse. Every request's JSON body, headers and arrival time are kept
in ``server.requests``. ``stop()`` (or leaving the ``with``) wakes slow handlers and joins.

Run standalone for a demo (prints the base URL, serves until interrupted)::

    python tests/llm_stub_server.py --port 8000
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


@dataclass
class Reply:
    """One scripted answer."""

    status: int = 200
    content: str = ""
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    raw_body: bytes | None = None
    """Sent as is instead of a chat-completion JSON body."""
    usage: dict[str, int] | None = None
    """Overrides the usage block; by default words are counted (see ``report_usage``)."""

    @classmethod
    def ok(cls, content: str, **kw: Any) -> "Reply":
        return cls(status=200, content=content, **kw)

    @classmethod
    def error(cls, status: int, retry_after: str | None = None, body: str = "") -> "Reply":
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        payload = body or json.dumps({"error": {"message": f"stub error {status}", "code": status}})
        return cls(status=status, headers=headers, raw_body=payload.encode())

    @classmethod
    def slow(cls, seconds: float, content: str = "[]") -> "Reply":
        return cls(status=200, content=content, delay=seconds)

    @classmethod
    def redirect(cls, location: str, status: int = 302) -> "Reply":
        return cls(status=status, headers={"Location": location}, raw_body=b"")

    @classmethod
    def garbage(cls) -> "Reply":
        return cls(status=200, raw_body=b"<html>502 Bad Gateway</html>")


ACTOR_LINE = re.compile(r"^- (?P<name>[^:\n]+): (?P<description>.+)$", re.MULTILINE)


def qa_responder(request: dict[str, Any]) -> Reply:
    """Two grounded pairs per actor listed in the last user message, as a JSON list."""
    prompt = next((m["content"] for m in reversed(request.get("messages", [])) if m.get("role") == "user"), "")
    pairs = []
    for match in ACTOR_LINE.finditer(prompt):
        name, description = match["name"].strip(), match["description"].strip().rstrip(".")
        pairs.append({"question": f"What does the {name.lower()} look like and do?",
                      "answer": f"The {name.lower()}: {description}."})
        pairs.append({"question": f"What is the {name.lower()} doing in the video?",
                      "answer": f"In the video, the {name.lower()} is seen as described: {description}."})
    return Reply.ok(json.dumps(pairs))


def _count_words(text: str) -> int:
    return len(text.split())


class StubChatServer:
    """An OpenAI-compatible chat-completions stub on 127.0.0.1, port chosen by the OS."""

    def __init__(self, responder: Callable[[dict[str, Any]], Reply] | None = None, *,
                 report_usage: bool = True, host: str = "127.0.0.1", port: int = 0):
        self.responder = responder or qa_responder
        self.report_usage = report_usage
        self.requests: list[dict[str, Any]] = []
        self._queue: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- control
    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self.requests)

    def push(self, *replies: Reply) -> None:
        """Queue replies to be served, in order, before the responder is asked."""
        with self._lock:
            self._queue.extend(replies)

    def start(self) -> "StubChatServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="llm-stub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # slow handlers wake up and give up
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "StubChatServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---------------------------------------------------------------- serving
    def _next_reply(self, body: dict[str, Any]) -> Reply:
        with self._lock:
            if self._queue:
                return self._queue.popleft()
        return self.responder(body)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
                pass

            def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timed out) first

            def do_GET(self) -> None:
                # What a client that follows a redirect sends (urllib turns POST into GET):
                # recorded, then answered like a POST, as a hostile redirect target would.
                self.do_POST(method="GET")

            def do_POST(self, method: str = "POST") -> None:
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length) if length else b"{}"
                try:
                    body = json.loads(raw)
                except ValueError:
                    self._send(400, b'{"error": {"message": "body is not JSON"}}', {})
                    return
                with server._lock:
                    server.requests.append({"path": self.path, "body": body, "headers": dict(self.headers),
                                            "method": method, "time": time.monotonic()})
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, b'{"error": {"message": "unknown path"}}', {})
                    return
                reply = server._next_reply(body)
                if reply.delay and server._stopping.wait(reply.delay):
                    return
                if reply.raw_body is not None:
                    self._send(reply.status, reply.raw_body, reply.headers)
                    return
                usage = reply.usage
                if usage is None and server.report_usage:
                    prompt = sum(_count_words(m.get("content", "")) for m in body.get("messages", []))
                    completion = _count_words(reply.content)
                    usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion}
                payload = {"id": f"stub-{server.request_count}", "object": "chat.completion",
                           "model": body.get("model", ""),
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": reply.content}}]}
                if usage is not None:
                    payload["usage"] = usage
                self._send(reply.status, json.dumps(payload).encode(), reply.headers)

        return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the QA stub chat endpoint until interrupted.")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = StubChatServer(port=args.port).start()
    print(server.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
