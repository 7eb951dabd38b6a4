"""Quality filter on extract's cheap signals. It marks ``drop_reason``; it never deletes."""

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
