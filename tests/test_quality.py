"""The black and frozen filters on real lavfi media: truly black/still clips are dropped, hard negatives
(dark but lively, slow but moving, grain and encoder noise) are kept. Figures: tests/bench/filter_bench.py."""

from __future__ import annotations


import numpy as np
import pytest

from pipeline.config import ExtractConfig, QualityConfig
from pipeline.stage import StageContext
from stages._picture import BlackParams, black_ratio, broad_change, changed_steps, frozen_ratio, is_black
from stages.extract import ExtractStage
from stages.quality import QualityStage
from tests.bench.filter_bench import CASES, clip_rows, make_case

SECONDS = 6.0
CHECKED = {
    # must drop
    "black": ("black", "frozen"),
    "black_grain": ("black", "frozen"),
    "still_grain": ("frozen",),
    "still_heavy_grain": ("frozen",),
    "still_grain_gop50": ("frozen",),
    "still_mpeg4": ("frozen",),
    # must keep (hard negatives)
    "life": (),
    "moving_dots": (),
    "star_drift": (),
    "night_street": (),
    "slow_pan": (),
    "slow_pan_grain": (),
    "slow_gradient_geq": (),  # geq, not lavfi ``gradients``: that differs from run to run (filter_bench._GRADIENT)
    "gradient_geq": (),
    "testsrc2": (),
    # textures that change everywhere, as uncorrelated as grain (issue 12), and a continuous zoom
    "cellauto_dim": (),
    "cellauto_dim_lowq": (),
    "cellauto_dim_2": (),
    "mandelbrot_zoom": (),
}


@pytest.fixture(scope="module")
def signals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("filters")
    extract = ExtractStage(ExtractConfig(frames_per_clip=1), StageContext(str(root / "staging")))
    out = {}
    for case in CASES:
        if case.name not in CHECKED:
            continue
        (row,) = clip_rows(make_case(case, root, SECONDS))
        (sig,) = extract.process_batch([row])
        assert not isinstance(sig, Exception), (case.name, sig)
        out[case.name] = {**row, **sig}
    return out


@pytest.mark.parametrize("name", sorted(CHECKED))
def test_filters_drop_black_and_still_and_keep_hard_negatives(signals: dict[str, dict], name: str) -> None:
    row = signals[name]
    cfg = QualityConfig(require_audio=False, max_silence_ratio=None)
    black = QualityStage(cfg.model_copy(update={"max_frozen_ratio": None})).reason(row) == "black"
    frozen = QualityStage(cfg.model_copy(update={"max_black_ratio": None})).reason(row) == "frozen"
    want = CHECKED[name]
    assert black == ("black" in want), (name, row["black_ratio"])
    assert frozen == ("frozen" in want), (name, row["frozen_ratio"])


def _frame(value: float = 16.0, shape: tuple[int, int] = (120, 160)) -> np.ndarray:
    return np.full(shape, value, np.float32)


def test_black_is_a_share_of_dark_pixels_without_lit_content() -> None:
    rng = np.random.default_rng(0)
    grain = [np.clip(_frame() + rng.normal(0, 6, (120, 160)), 0, 255).astype(np.float32) for _ in range(4)]
    assert black_ratio(grain) == 1.0
    dim = _frame(60.0)  # a dim grey picture is not black
    assert not is_black(dim)
    stars = _frame()
    stars[rng.integers(0, 120, 30), rng.integers(0, 160, 30)] = 200.0  # 30 lit pixels: 0.16 %
    assert not is_black(stars)
    logo = _frame()
    logo[:2, :2] = 200.0  # 4 lit pixels (0.02 %): still black, as blackdetect says
    assert is_black(logo)
    assert not is_black(logo, BlackParams(lit_share=0.0001))


def test_frozen_is_relative_to_the_clip_noise() -> None:
    rng = np.random.default_rng(1)
    x = np.linspace(0, 6 * np.pi, 200)
    base = 120 + 60 * np.sin(x)[None, :] * np.cos(np.linspace(0, 4 * np.pi, 120))[:, None]
    still = [(base[:, :160] + rng.normal(0, 4, (120, 160))).astype(np.float32) for _ in range(30)]
    assert frozen_ratio(still) == 1.0  # grain, no motion
    # a pan of 0.3 px per analysis frame (sub-pixel: interpolated), with the same grain
    cols = np.arange(160, dtype=np.float64)
    pan = []
    for k in range(30):
        shifted = np.stack([np.interp(cols + 0.3 * k, np.arange(200), row) for row in base])
        pan.append((shifted + rng.normal(0, 4, (120, 160))).astype(np.float32))
    assert frozen_ratio(pan) < 0.9
    # one small light (4 pixels) moving over a still dark picture
    dots = []
    for k in range(30):
        f = _frame(20.0)
        f[60:62, 10 + 4 * k : 12 + 4 * k] = 220.0
        dots.append(f)
    assert frozen_ratio(dots) == 0.0
    # a still picture whose encoder re-codes it at each key frame (one step in 15): not a change
    jumpy = [s + (3.0 if (k // 15) % 2 else 0.0) for k, s in enumerate(still)]
    keys = [k % 15 == 0 for k in range(30)]
    assert not any(changed_steps(jumpy, keys))


def test_a_texture_that_changes_everywhere_is_motion_and_grain_is_not() -> None:
    """Issue 12: a dim cellular automaton changes every pixel by ~20 levels, in a pattern as uncorrelated
    as grain; the noise-relative rules alone read it as noise (its noise floor is its own change)."""
    rng = np.random.default_rng(2)
    rows = (rng.random((150, 160)) < 0.4).astype(np.float32)
    dim = [16.0 + 40.0 * rows[3 * k : 3 * k + 120] for k in range(10)]  # scrolls 3 rows a step
    assert frozen_ratio(dim) == 0.0
    flicker = [16.0 + 40.0 * (rng.random((120, 160)) < 0.4).astype(np.float32) for _ in range(10)]
    assert frozen_ratio(flicker) == 0.0  # a new random texture each step: nothing stable to be noise around
    # grain around a stable picture stays noise, even grain far heavier than encoders leave
    x = np.linspace(0, 6 * np.pi, 160)
    base = 120 + 60 * np.sin(x)[None, :] * np.cos(np.linspace(0, 4 * np.pi, 120))[:, None]
    heavy = [(base + rng.normal(0, 12, base.shape)).astype(np.float32) for _ in range(10)]
    assert not broad_change(heavy[0], heavy[1])
    assert frozen_ratio(heavy) == 1.0
    light_on_black = [_frame() + rng.normal(0, 4, (120, 160)).astype(np.float32) for _ in range(10)]
    assert frozen_ratio(light_on_black) == 1.0
