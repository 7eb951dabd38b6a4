from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import RunConfig, dump_config, load_config
from pipeline.errors import ConfigError


def test_defaults_validate() -> None:
    cfg = load_config(None, [])
    assert cfg.stages[:3] == ["download", "split", "extract"]
    assert cfg.split.mode == "fixed"


def test_overrides_parse_yaml_values() -> None:
    cfg = load_config(None, ["split.mode=shots", "extract.frames_per_clip=3", "write.keep_staging=true"])
    assert cfg.split.mode == "shots"
    assert cfg.extract.frames_per_clip == 3
    assert cfg.write.keep_staging is True


def test_unknown_key_names_key_and_allowed(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("split:\n  mod: shots\n")
    with pytest.raises(ConfigError) as info:
        load_config(f, [])
    msg = str(info.value)
    assert "split.mod: unknown key" in msg
    assert "mode" in msg  # the allowed keys are listed


def test_wrong_type_and_value_messages() -> None:
    with pytest.raises(ConfigError, match="extract.frames_per_clip"):
        load_config(None, ["extract.frames_per_clip=many"])
    with pytest.raises(ConfigError, match="split.mode"):
        load_config(None, ["split.mode=random"])
    with pytest.raises(ConfigError, match="min_clip_seconds <= clip_seconds"):
        load_config(None, ["split.clip_seconds=1", "split.min_clip_seconds=2"])
    with pytest.raises(ConfigError, match="unknown stage"):
        load_config(None, ["stages=[download, teleport]"])


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml", [])
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(f, [])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["novalue"])


def test_dump_roundtrip(tmp_path: Path) -> None:
    cfg = load_config(None, ["split.overlap_seconds=1.5"])
    f = tmp_path / "resolved.yaml"
    f.write_text(dump_config(cfg))
    assert load_config(f, []) == cfg
    assert isinstance(cfg, RunConfig)
