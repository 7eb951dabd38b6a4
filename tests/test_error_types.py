"""error_type is a documented, closed set (pipeline/errors.py ERROR_TYPES, README "Error types")."""

from __future__ import annotations

import ast
from pathlib import Path

from pipeline.errors import ERROR_TYPES, StageError, error_message_of, error_type_of

ROOT = Path(__file__).resolve().parents[1]


def _literal_error_types() -> dict[str, str]:
    """Every string literal given as a StageError's error_type in stages/ and pipeline/."""
    found: dict[str, str] = {}
    for path in [*ROOT.glob("pipeline/*.py"), *ROOT.glob("stages/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and ast.unparse(node.func).endswith("StageError")):
                continue
            args = list(node.args[1:2]) + [k.value for k in node.keywords if k.arg == "error_type"]
            for arg in args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    found[arg.value] = f"{path.relative_to(ROOT)}:{node.lineno}"
    return found


def test_every_error_type_in_the_code_is_documented() -> None:
    used = _literal_error_types()
    assert used, "the scan found no StageError calls"
    unknown = {t: where for t, where in used.items() if t not in ERROR_TYPES}
    assert not unknown, f"add these to pipeline/errors.py ERROR_TYPES and the README table: {unknown}"


def test_readme_lists_every_error_type() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [t for t in ERROR_TYPES if f"| `{t}` |" not in readme]
    assert not missing, missing


def test_unknown_failures_map_to_a_documented_type() -> None:
    class NoSupportingHandlers(Exception):
        pass

    exc = NoSupportingHandlers("Unsupported URL: rtsp://x")
    assert error_type_of(exc) == "internal_error"
    assert error_message_of(exc) == "NoSupportingHandlers: Unsupported URL: rtsp://x"
    assert error_type_of(StageError("gone", "not_found")) == "not_found"
    assert error_type_of(StageError("odd", "made_up_type")) == "internal_error"
    assert "made_up_type" in error_message_of(StageError("odd", "made_up_type"))
    assert error_type_of(MemoryError()) == "out_of_memory"
