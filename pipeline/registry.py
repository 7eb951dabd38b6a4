"""Stage names known to the runner, as import paths (nothing heavy is imported here).

Each entry maps a stage name (used in ``RunConfig.stages``) to the stage class and the
``RunConfig`` section holding its settings. The engine (``pipeline/``) names concrete stages only
here, as ``"module:Class"`` strings imported when a pipeline is checked or built, never at import
time; ``pipeline.config`` imports this module inside its validator, and this module imports
``pipeline.config`` and ``pipeline.stage`` for type checking only, so there is no import cycle.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import RunConfig
    from pipeline.stage import Stage, StageContext

STAGES: dict[str, tuple[str, str]] = {
    "download": ("stages.download:DownloadStage", "download"),
    "split": ("stages.split:SplitStage", "split"),
    "extract": ("stages.extract:ExtractStage", "extract"),
    "quality": ("stages.quality:QualityStage", "quality"),
    "asr": ("stages.asr:AsrStage", "asr"),
    "audio_tags": ("stages.audio_tags:AudioTagStage", "audio_tags"),
    "fingerprint": ("stages.fingerprint:FingerprintStage", "fingerprint"),
    "dedup": ("stages.dedup:DedupStage", "dedup"),
    "fuse": ("stages.fuse:FuseStage", "fuse"),
    "judge": ("stages.judge:JudgeStage", "judge"),
    "visual_tags": ("stages.visual_tags:VisualTagStage", "visual_tags"),
    "visual_caption": ("stages.visual_caption:VisualCaptionStage", "visual_caption"),
    "visual_quality": ("stages.visual_quality:VisualQualityStage", "visual_quality"),
    "text_embed": ("stages.text_embed:TextEmbedStage", "text_embed"),
    "audio_caption": ("stages.audio_caption:AudioCaptionStage", "audio_caption"),
    "caption_select": ("stages.agreement:CaptionSelectStage", "agreement"),
    "agreement": ("stages.agreement:AgreementStage", "agreement"),
}


# Columns every input row carries from ingest (stages/ingest.py), before the first stage.
INGEST_COLUMNS: tuple[str, ...] = ("video_id", "source_url", "fetch_url", "input_index", "metadata_json")


def stage_class(name: str) -> type[Stage]:
    path, _ = STAGES[name]
    module, cls = path.split(":")
    return getattr(importlib.import_module(module), cls)  # type: ignore[no-any-return]


def build_stage(name: str, config: RunConfig, context: StageContext) -> Stage:
    """Construct (but do not set up) the stage ``name`` with its config section."""
    _, section = STAGES[name]
    return stage_class(name)(getattr(config, section), context)


def build_stages(config: RunConfig, context: StageContext) -> list[Stage]:
    return [build_stage(name, config, context) for name in config.stages]


def _writes(name: str) -> tuple[str, ...]:
    try:
        return stage_class(name).writes
    except ImportError:
        return ()


def unmet_reads(names: Sequence[str]) -> list[str]:
    """Problems of a stage list: each stage whose required reads (``reads`` minus
    ``optional_reads``) neither ingest nor an earlier stage writes. Empty when the list is sound."""
    available = set(INGEST_COLUMNS)
    problems: list[str] = []
    for position, name in enumerate(names):
        try:
            cls = stage_class(name)
        except ImportError as exc:  # a stage whose extra is not installed
            problems.append(f"stage {name!r} cannot be loaded ({exc}); is its extra installed? (see README)")
            continue
        missing = [c for c in cls.required_reads() if c not in available]
        if missing:
            before = ", ".join(names[:position]) or "nothing"
            writers = sorted(n for n in STAGES if n != name and any(c in _writes(n) for c in missing))
            hint = f"; written by {', '.join(writers)}" if writers else ""
            problems.append(
                f"stage {name!r} reads {', '.join(repr(c) for c in missing)}, which no earlier stage "
                f"({before}) writes{hint}"
            )
        available.update(cls.writes)
    return problems


def actor_cpu_demand(config: RunConfig) -> float:
    """CPUs the actor pools of ``config``'s stages reserve at their minimum size (``cpus × pool_size``
    of each stateful stage). An in-process Ray needs at least this many logical CPUs, plus room for
    the task stages, or a pool never starts and the run waits forever (the whole default recipe has
    five or six model pools; a laptop has fewer cores)."""
    from pipeline.stage import StageContext

    return sum(
        s.resources.cpus * s.resources.pool_size for s in build_stages(config, StageContext()) if s.stateful
    )
