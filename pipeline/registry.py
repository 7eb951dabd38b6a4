"""Stage names known to the runner, as import paths (nothing heavy is imported here).

Each entry maps a stage name (used in ``RunConfig.stages``) to the stage class and the
``RunConfig`` section holding its settings.
"""

from __future__ import annotations

import importlib
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
}


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
