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


# ---------------------------------------------------------------------- recipes, merge order, skip_stages


def test_recipe_then_configs_left_to_right_then_set(tmp_path: Path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("split:\n  clip_seconds: 6\n  min_clip_seconds: 1\nextract:\n  frames_per_clip: 2\n")
    b.write_text("split:\n  clip_seconds: 5\nextract:\n  jpeg_quality: 70\n")
    cfg = load_config([a, b], ["split.clip_seconds=4"], recipe="wavcaps")
    assert cfg.recipe == "wavcaps" and cfg.fuse.preset == "wavcaps"  # from the recipe
    assert cfg.split.mode == "fixed" and cfg.split.min_clip_seconds == 1  # recipe, then a
    assert cfg.extract.frames_per_clip == 2 and cfg.extract.jpeg_quality == 70  # a and b merge, not replace
    assert cfg.split.clip_seconds == 4  # --set last
    c = tmp_path / "c.yaml"
    c.write_text("stages: [download, split, extract, quality]\n")  # a list replaces the recipe's
    assert load_config([c], [], recipe="mmtrail").stages == ["download", "split", "extract", "quality"]


def test_skip_stages_leave_stages_out_and_gpu_overlay_brings_them_back() -> None:
    cfg = load_config(None, [], recipe="mmtrail")
    assert "visual_caption" not in cfg.stages
    assert cfg.skip_stages == ["visual_tags", "visual_caption", "audio_caption", "caption_select", "agreement"]
    assert cfg.stages[-2:] == ["fuse", "judge"]
    cfg = load_config(None, ["skip_stages=[]"], recipe="mmtrail")
    assert cfg.stages.index("visual_tags") < cfg.stages.index("visual_caption") < cfg.stages.index("fuse")
    assert cfg.stages.index("audio_caption") < cfg.stages.index("caption_select") < cfg.stages.index("fuse")
    assert cfg.stages.index("fuse") < cfg.stages.index("agreement") < cfg.stages.index("judge")
    assert load_config(None, [], recipe="mmtrail") == load_config(None, [], recipe="mmtrail")
    with pytest.raises(ConfigError, match="unknown stage"):
        load_config(None, ["skip_stages=[teleport]"])
    with pytest.raises(ConfigError, match="leaves no stage"):
        load_config(None, ["stages=[download]", "skip_stages=[download]"])


def test_unknown_recipe() -> None:
    with pytest.raises(ConfigError, match="unknown recipe 'nope'; known: .*mmtrail"):
        load_config(None, [], recipe="nope")


# ---------------------------------------------------------------------- checked reads


def test_a_stage_whose_reads_no_earlier_stage_writes_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"stage 'extract' reads 'key'.*no earlier stage \(download\) writes; written by split"):
        load_config(None, ["stages=[download, extract]"])
    with pytest.raises(ConfigError, match="stage 'judge' reads 'caption'.*written by fuse"):
        load_config(None, ["stages=[download, split, extract, quality, judge, fuse]"])
    with pytest.raises(ConfigError, match="stage 'dedup' reads 'content_hash'"):
        load_config(None, ["stages=[download, split, extract, dedup, fingerprint]"])
    # optional reads (signals fuse uses when present) are not required
    load_config(None, ["stages=[download, split, extract, quality, fuse]"])


# ---------------------------------------------------------------------- bad commands: one line, exit status 2


def _cli(capsys: pytest.CaptureFixture[str], tmp_path: Path, *extra: str, output: Path | None = None) -> tuple[int, str]:
    from pipeline.cli import main

    inputs = tmp_path / "list.txt"
    inputs.write_text("")
    out = output or tmp_path / "out"
    code = main(["run", "--input", str(inputs), "--output", str(out), "--dry-run", *extra])
    err = capsys.readouterr().err
    return code, err


def _one_line_error(code: int, err: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("avforge: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_output_that_is_a_file_or_under_one(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    f = tmp_path / "taken"
    f.write_text("x")
    line = _one_line_error(*_cli(capsys, tmp_path, output=f))
    assert "is an existing file" in line
    line = _one_line_error(*_cli(capsys, tmp_path, output=f / "deeper" / "out"))
    assert "lies under" in line and "taken" in line
    line = _one_line_error(*_cli(capsys, tmp_path, output=tmp_path / ("x" * 5000)))
    assert len(line) < 600  # ENAMETOOLONG: the name is echoed cut short
    assert _cli(capsys, tmp_path, output=tmp_path / "fresh")[0] == 0


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e999"])
def test_non_finite_numbers_are_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path, value: str) -> None:
    line = _one_line_error(*_cli(capsys, tmp_path, "--set", f"download.max_filesize_mb={value}"))
    assert "download.max_filesize_mb" in line and "finite" in line


def test_empty_stage_list(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = _one_line_error(*_cli(capsys, tmp_path, "--set", "stages=[]"))
    assert "stages" in line and "at least 1" in line


@pytest.mark.parametrize(
    "assignment",
    [
        "download.proxy=!!binary aGVsbG8=",
        "download.retries=!!int 3",
        "split.mode=!!python/object/apply:os.system ['touch pwned']",
        "download.allowed_hosts=!!set {a, b}",
        "extract.frames_per_clip=!custom 3",
        "stages=[download, !!str split]",
        "report.seed=2026-01-01",  # an implicit timestamp is not a tag: a plain type error
    ],
)
def test_yaml_tags_in_set_values_are_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path, assignment: str) -> None:
    line = _one_line_error(*_cli(capsys, tmp_path, "--set", assignment))
    if "2026" in assignment:
        assert "report.seed" in line
    else:
        assert "YAML tag" in line and "not allowed" in line
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_a_quoted_bang_is_text(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert _cli(capsys, tmp_path, "--set", "visual_caption.text_prompt='!a video of'")[0] == 0


BILLION_LAUGHS = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


@pytest.mark.timeout(20)
def test_billion_laughs_config_is_refused_quickly(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BILLION_LAUGHS)
    assert len(BILLION_LAUGHS) < 400
    line = _one_line_error(*_cli(capsys, tmp_path, "--config", str(bomb)))
    assert "expands to more than" in line and len(line) < 300
    # the same through --set, and a self-referencing alias
    line = _one_line_error(*_cli(capsys, tmp_path, "--set", "split=" + BILLION_LAUGHS.replace("\n", ", ").join("{}")))
    assert "--set split: YAML expands to more than" in line
    loop = tmp_path / "loop.yaml"
    loop.write_text("split: &s {x: *s}\n")
    assert "expands to more than" in _one_line_error(*_cli(capsys, tmp_path, "--config", str(loop)))


def test_small_aliases_are_fine(tmp_path: Path) -> None:
    f = tmp_path / "shared.yaml"
    f.write_text("fuse:\n  llm: &llm {temperature: 0.2, max_tokens: 200}\njudge:\n  llm: *llm\n")
    cfg = load_config(f, [])
    assert cfg.judge.llm.temperature == 0.2 and cfg.fuse.llm.max_tokens == 200


def test_duplicate_keys_and_deep_nesting_are_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    dup = tmp_path / "dup.yaml"
    dup.write_text("split:\n  mode: shots\n  mode: fixed\n")
    assert "duplicate key 'mode' at line 3" in _one_line_error(*_cli(capsys, tmp_path, "--config", str(dup)))
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    assert "nested deeper" in _one_line_error(*_cli(capsys, tmp_path, "--config", str(deep)))
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text("split: !!python/object:os.system {}\n")
    assert "YAML tag" in _one_line_error(*_cli(capsys, tmp_path, "--config", str(tagged)))


def test_echoed_values_are_capped(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    huge = "x" * 100_000
    line = _one_line_error(*_cli(capsys, tmp_path, "--set", f"split.mode={huge}"))
    assert "split.mode" in line and len(line) < 600
    line = _one_line_error(*_cli(capsys, tmp_path, "--set", f"split.{huge}=1"))
    assert "unknown key" in line and len(line) < 1000
    many = tmp_path / "many.yaml"
    many.write_text("split:\n" + "".join(f"  k{i}: {i}\n" for i in range(500)))
    line = _one_line_error(*_cli(capsys, tmp_path, "--config", str(many)))
    assert "and 490 more" in line and len(line) < 4100
    nested = tmp_path / "nested.yaml"
    nested.write_text("stages: " + str([[["a" * 50] * 50] * 50]) + "\n")
    assert len(_one_line_error(*_cli(capsys, tmp_path, "--config", str(nested)))) < 1500


def test_config_file_problems_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("split:\n  mode: [shots\n")
    assert "not valid YAML" in _one_line_error(*_cli(capsys, tmp_path, "--config", str(bad)))
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00split")
    assert "UTF-8" in _one_line_error(*_cli(capsys, tmp_path, "--config", str(binary)))
    assert "is a directory" in _one_line_error(*_cli(capsys, tmp_path, "--config", str(tmp_path)))
    two = tmp_path / "two.yaml"
    two.write_text("split: {}\n---\nextract: {}\n")
    assert "not valid YAML" in _one_line_error(*_cli(capsys, tmp_path, "--config", str(two)))
    assert "unknown recipe" in _one_line_error(*_cli(capsys, tmp_path, "--recipe", "../../etc/passwd"))


# ---------------------------------------------------------------------- engine layout

ROOT = Path(__file__).resolve().parents[1]


def _top_level_imports(path: Path) -> set[str]:
    """pipeline.* modules a file imports when it is imported (not in functions, not for type checking)."""
    import ast

    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
            for field in ("body", "orelse", "handlers", "finalbody"):
                if isinstance(node, (ast.If, ast.Try, ast.With)) and hasattr(node, field):
                    visit(getattr(node, field))

    visit(ast.parse(path.read_text()).body)
    return {m for m in found if m.startswith("pipeline.") and (ROOT / (m.replace(".", "/") + ".py")).exists()}


def test_no_import_cycle_in_the_engine() -> None:
    graph = {f"pipeline.{p.stem}": _top_level_imports(p) for p in (ROOT / "pipeline").glob("*.py")}

    def closure(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), set()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    assert not ({"pipeline.registry", "pipeline.stage"} & closure("pipeline.config"))
    assert "pipeline.registry" not in closure("pipeline.stage")
    cycles = sorted(m for m in graph if m in closure(m))
    assert cycles == [], f"modules importing themselves through others: {cycles}"


def test_the_engine_imports_no_concrete_stage() -> None:
    """Importing the engine loads no stage module: the registry names them as strings, imported when a
    pipeline is checked or built."""
    import subprocess
    import sys

    from pipeline.registry import STAGES

    engine = [m for m in ("config", "registry", "stage", "executor", "runner", "ray_runner", "writer", "resume",
                          "ingest", "storage", "layout", "cli") if (ROOT / "pipeline" / f"{m}.py").exists()]  # fmt: skip
    stage_modules = sorted({path.split(":")[0] for path, _ in STAGES.values()})
    code = (f"import sys\nfor m in {engine!r}: __import__('pipeline.' + m)\n"
            f"print(sorted(m for m in {stage_modules!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_engine_imports_no_tool() -> None:
    """The engine (every module directly under pipeline/, the CLI included) loads no module of
    pipeline/tools/ (report, inspect, loader, samples, serve, bench) when it is imported."""
    import subprocess
    import sys

    engine = sorted(p.stem for p in (ROOT / "pipeline").glob("*.py") if p.stem != "__init__")
    tools = sorted(p.stem for p in (ROOT / "pipeline" / "tools").glob("*.py") if p.stem != "__init__")
    assert {"report", "inspect", "loader", "samples", "serve", "bench"} <= set(tools)
    assert {"config", "registry", "stage", "runner", "cli"} <= set(engine)
    assert not set(engine) & set(tools)
    code = (f"import sys\nfor m in {engine!r}: __import__('pipeline.' + m)\n"
            "print(sorted(m for m in sys.modules if m.startswith('pipeline.tools')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_more_hostile_values_are_one_line_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = _one_line_error(*_cli(capsys, tmp_path, "--set", "download.concurrency=" + "9" * 400))
    assert "download.concurrency" in line and len(line) < 600
    assert "must be between" in _one_line_error(*_cli(capsys, tmp_path, "--set", "split.clip_seconds=1e300"))
    assert "larger than" in _one_line_error(*_cli(capsys, tmp_path, "--config", "/dev/zero"))
    assert "cannot read config file" in _one_line_error(*_cli(capsys, tmp_path, "--config", "a\x00b"))
    assert "NUL" in _one_line_error(*_cli(capsys, tmp_path, output=Path(str(tmp_path / "o") + "\x00x")))
    line = _one_line_error(*_cli(capsys, tmp_path, "--config", str(tmp_path / ("c" * 300) / "x.yaml")))
    assert "config file" in line and len(line) < 600
