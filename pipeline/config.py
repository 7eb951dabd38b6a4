"""Run configuration: pydantic models, YAML files and ``--set key=value`` overrides.

Every model forbids unknown keys, so a typo fails loudly with the list of allowed keys.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DownloadConfig(Section):
    format: str | None = Field(None, description="yt-dlp format selector; default: best with max_height")
    max_height: int | None = Field(720, gt=0, description="highest video height to download")
    cookies_file: Path | None = None
    proxy: str | None = None
    rate_limit: str | None = Field(None, description="bytes/s, e.g. '2M'")
    sleep_seconds: float = Field(0.0, ge=0, description="pause before each download")
    retries: int = Field(3, ge=0, description="retries of transient failures")
    backoff_seconds: float = Field(1.0, ge=0, description="first retry delay; doubles each retry")
    timeout_seconds: float = Field(30.0, gt=0, description="socket timeout")
    max_filesize_mb: float | None = Field(2048.0, gt=0)
    max_duration_seconds: float | None = Field(4 * 3600.0, gt=0)
    concurrency: int = Field(4, ge=1, description="downloads in flight")
    allow_local_paths: bool = Field(True, description="accept local paths and file:// URLs")


class SplitConfig(Section):
    mode: Literal["fixed", "shots", "whole"] = "fixed"
    clip_seconds: float = Field(10.0, gt=0, description="target clip length (fixed windows)")
    min_clip_seconds: float = Field(2.0, gt=0)
    max_clip_seconds: float = Field(20.0, gt=0)
    overlap_seconds: float = Field(0.0, ge=0)
    shot_threshold: float = Field(3.0, gt=0, description="adaptive cut threshold of the shot detector")
    min_shot_seconds: float = Field(0.6, gt=0)
    max_clips_per_video: int = Field(10_000, ge=1)

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
    silence_db: float = Field(-50.0, description="50 ms windows below this RMS (dBFS) count as silent")
    batch_size: int = Field(16, ge=1)


class QualityConfig(Section):
    """Cheap filters on extract's signals; a clip that fails gets ``drop_reason``."""

    require_audio: bool = True
    require_video: bool = True
    max_silence_ratio: float | None = Field(0.98, ge=0, le=1)
    max_black_ratio: float | None = Field(0.9, ge=0, le=1)
    max_frozen_ratio: float | None = Field(0.95, ge=0, le=1)


class WriteConfig(Section):
    max_samples_per_shard: int = Field(1000, ge=1)
    max_shard_mb: float = Field(1024.0, gt=0)
    keep_staging: bool = Field(False, description="keep downloaded files and extracted media after writing")


class RayConfig(Section):
    address: str | None = Field(None, description="Ray cluster address; None starts Ray in-process")
    num_cpus: int | None = Field(None, ge=1, description="logical CPUs of the in-process Ray (default: cores)")
    object_store_mb: int = Field(1024, ge=128)
    workers_per_cpu_stage: int | None = Field(None, ge=1, description="tasks in flight per CPU stage")


class RunConfig(Section):
    stages: list[str] = Field(default_factory=lambda: ["download", "split", "extract", "quality"])
    staging_dir: Path | None = Field(None, description="default: OUTPUT/_staging")
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    write: WriteConfig = Field(default_factory=WriteConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _known_stages(self) -> RunConfig:
        from pipeline.registry import STAGES

        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; known: {sorted(STAGES)}")
        return self


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to a config dict."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    dotted, raw = assignment.split("=", 1)
    parts = [p for p in dotted.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set has an empty key: {assignment!r}")
    node = data
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {p!r} is not a section")
        node = child
    node[parts[-1]] = _parse_value(raw)


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key{_allowed_hint(e['loc'])}")
        else:
            lines.append(f"  {where}: {e['msg']} (got {e.get('input')!r})")
    return "invalid config:\n" + "\n".join(lines)


def _allowed_hint(loc: tuple[Any, ...]) -> str:
    model: type[BaseModel] = RunConfig
    for p in loc[:-1]:
        field = model.model_fields.get(str(p))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return ""
        model = ann
    return f" (allowed: {', '.join(sorted(model.model_fields))})"


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load YAML (optional), apply overrides, validate. Raises ConfigError with a readable message."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping, got {type(loaded).__name__}")
        data = copy.deepcopy(loaded)
    for assignment in overrides or []:
        apply_override(data, assignment)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
