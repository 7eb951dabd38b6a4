"""Quality filter on extract's cheap signals. It marks ``drop_reason``; it never deletes.

``black_ratio`` and ``frozen_ratio`` are measured by ``stages._picture`` on extract's analysis
frames: black as a share of dark pixels with no lit content (ffmpeg ``blackdetect`` style, so a
starry sky or a night street is not black), frozen as no change since a reference frame beyond the
clip's own noise (``freezedetect`` style, so a slow pan is not frozen and grain on a still picture
is). Their false-drop and miss rates on a labelled corpus: ``python -m tests.bench.filter_bench``.
``no_audio`` also covers a declared audio stream without a single packet (``stages._media.probe``),
``no_video`` a file whose only picture is cover art.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import QualityConfig
from pipeline.stage import Resources, Row, Stage


class QualityStage(Stage[QualityConfig]):
    name = "quality"
    reads = ("has_audio", "has_video", "silence_ratio", "black_ratio", "frozen_ratio")
    writes = ("drop_reason",)

    @property
    def resources(self) -> Resources:
        return Resources(cpus=1.0)

    @property
    def batch_size(self) -> int:
        return 64

    def reason(self, row: Row) -> str | None:
        cfg = self.config
        if cfg.require_video and not row.get("has_video"):
            return "no_video"
        if cfg.require_audio and not row.get("has_audio"):
            return "no_audio"
        checks = (
            ("black", row.get("black_ratio"), cfg.max_black_ratio),
            ("frozen", row.get("frozen_ratio"), cfg.max_frozen_ratio),
            ("silent", row.get("silence_ratio"), cfg.max_silence_ratio),
        )
        for reason, value, limit in checks:
            if limit is not None and value is not None and value > limit:
                return reason
        return None

    def process_batch(self, rows: list[Row]) -> list[Any]:
        return [{"drop_reason": self.reason(r)} for r in rows]
