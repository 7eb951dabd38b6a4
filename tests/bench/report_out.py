"""How a bench hands back its figures: the JSON report on stdout, and in a file when asked."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def emit(report: dict[str, Any], path: Path | None = None) -> None:
    """Print ``report`` as indented JSON; also write it to ``path`` when given."""
    text = json.dumps(report, indent=2)
    sys.stdout.write(text + "\n")
    if path is not None:
        path.write_text(text + "\n")
