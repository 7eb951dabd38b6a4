"""A small, real OpenAI-compatible chat server on 127.0.0.1 that serves an in-process LLM backend.

Used where ``python -m llama_cpp.server`` is not installed (llama-cpp-python is an optional extra):
the ``openai`` backend is then tested against a real model behind real HTTP. It speaks the subset of
the API the ``openai`` backend uses: ``GET /v1/models``, ``POST /v1/chat/completions`` with
``max_tokens``, ``temperature``, ``response_format`` (``json_schema`` / ``json_object`` with a
``schema``), ``logprobs`` + ``top_logprobs``, bearer-key auth (401 on a wrong key), 400 on a failed
request (e.g. a prompt longer than the context window). Requests are served one at a time (the
backend is one model).

``scripted`` serves answers a test writes itself (errors, delays, canned completions) the same way.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from stages._llm import ChatRequest, ChatResult, LLMBackend


def _schema_of(fmt: Any) -> dict[str, Any] | None:
    if not isinstance(fmt, dict):
        return None
    if fmt.get("type") == "json_schema":
        return (fmt.get("json_schema") or {}).get("schema")  # type: ignore[no-any-return]
    if fmt.get("type") == "json_object":
        return fmt.get("schema") or {"type": "object"}  # type: ignore[no-any-return]
    return None


def completion_body(result: ChatResult, model: str, want_logprobs: bool) -> dict[str, Any]:
    """An OpenAI chat completion (dict) from a ChatResult."""
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": result.text},
        "finish_reason": result.finish_reason or "stop",
    }
    if want_logprobs and result.logprobs is not None:
        content = [
            {
                "token": t.token,
                "logprob": t.logprob,
                "top_logprobs": [{"token": k, "logprob": v} for k, v in sorted(t.top.items(), key=lambda kv: -kv[1])],
            }
            for t in result.logprobs
        ]
        start = result.logprobs[0].offset if result.logprobs else 0
        if start > 0 and result.text:  # text the backend wrote itself (a prefilled JSON key): certain
            forced = result.text[:start]
            content.insert(0, {"token": forced, "logprob": 0.0, "top_logprobs": [{"token": forced, "logprob": 0.0}]})
        choice["logprobs"] = {"content": content}
    return {
        "id": f"chatcmpl-{time.monotonic_ns()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": {
            "prompt_tokens": result.prompt_tokens or 0,
            "completion_tokens": result.completion_tokens or 0,
            "total_tokens": (result.prompt_tokens or 0) + (result.completion_tokens or 0),
        },
    }


Reply = tuple[int, dict[str, Any] | bytes, dict[str, str]]  # status, JSON document or raw body, headers


def chat_completion(text: str, prompt_tokens: int = 11, completion_tokens: int = 7) -> dict[str, Any]:
    """A minimal OpenAI chat completion whose answer is ``text``."""
    return {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
    }


def send(handler: BaseHTTPRequestHandler, status: int, payload: dict[str, Any] | bytes, headers: dict[str, str] | None = None) -> None:
    """Answer ``handler``'s request: a JSON document (dict) or raw bytes; a client gone away is ignored."""
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    handler.send_response(status)
    if not isinstance(payload, bytes):
        handler.send_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        handler.send_header(k, v)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    try:
        handler.wfile.write(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


@contextmanager
def running(handler: type[BaseHTTPRequestHandler], name: str) -> Iterator[str]:
    """``handler`` served by threads on a free port of 127.0.0.1; yields the base URL (``.../v1``)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@contextmanager
def scripted(reply: Callable[[dict[str, Any], dict[str, str]], Reply]) -> Iterator[str]:
    """Answer every POST with ``reply(json_body, request_headers)``; yields the base URL (``.../v1``)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status, payload, headers = reply(body, dict(self.headers))
            send(self, status, payload, headers)

    with running(Handler, "openai-scripted") as base:
        yield base


@contextmanager
def serve(backend: LLMBackend, *, model: str = "local", api_key: str | None = None) -> Iterator[str]:
    """Serve ``backend`` on a free port of 127.0.0.1; yields the base URL (``http://127.0.0.1:PORT/v1``)."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _authorised(self) -> bool:
            if api_key is None or self.headers.get("Authorization") == f"Bearer {api_key}":
                return True
            self._send(401, {"error": {"message": "invalid api key", "type": "invalid_request_error"}})
            return False

        def do_GET(self) -> None:
            if not self._authorised():
                return
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": model, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": "not found"}})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            if not self._authorised():
                return
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, {"error": {"message": "not found"}})
                return
            try:
                body = json.loads(raw)
                want_logprobs = bool(body.get("logprobs"))
                request = ChatRequest(
                    messages=body["messages"],
                    max_tokens=int(body.get("max_tokens") or 256),
                    temperature=float(body.get("temperature") or 0.0),
                    json_schema=_schema_of(body.get("response_format")),
                    logprobs=int(body.get("top_logprobs") or 1) if want_logprobs else 0,
                )
            except (ValueError, KeyError, TypeError) as exc:
                self._send(400, {"error": {"message": f"bad request: {exc}"}})
                return
            with lock:
                (result,) = backend.chat([request])
            if result.error is not None:
                self._send(400, {"error": {"message": result.error, "type": "invalid_request_error"}})
                return
            self._send(200, completion_body(result, model, want_logprobs))

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            send(self, status, payload)

    with running(Handler, "openai-compat") as base:
        yield base
