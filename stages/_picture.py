"""Black and frozen pictures, measured against the picture's own content and noise (no model).

Both signals work on small greyscale analysis frames (``ANALYSIS_WIDTH`` wide, area-averaged luma,
limited range: black is 16) sampled a few times per second.

**Black** follows ffmpeg's ``blackdetect``: a frame is black when at least ``picture_ratio`` of its
pixels are darker than ``pixel_luma`` - *and* it shows no lit content: when at least ``lit_share`` of
its pixels are bright (``LIT_LUMA``), it is a dark picture with something in it (stars, a
spotlight, a few moving lights, Conway's life) and not black. Film grain and encoder noise on black
stay far below ``LIT_LUMA``, so black with grain is still black.

**Frozen** follows ffmpeg's ``freezedetect``: each frame is compared with a *reference* frame (the
last one that showed a change), not only with its neighbour, so a slow pan or a slowly turning
gradient that moves a fraction of a pixel per frame accumulates until it shows. A frame changed
when either

* *sparse change*: at least ``SPARSE_SHARE`` of its pixels differ from the reference by more than
  ``SPARSE_LUMA`` luma levels (or 6 noise deviations of the difference, when the picture is that
  noisy): small bright objects moving on a still background, cells of a cellular automaton; or
* *broad change*: the mean absolute difference from the reference is at least ``BROAD_LUMA`` luma
  levels *and* at least ``BROAD_OVER_TEXTURE`` times the reference's own contrast (its standard
  deviation): a texture that changes everywhere at once (a scrolling cellular automaton, dense
  particles) whose change is spatially as uncorrelated as grain, so that block averaging and the
  noise-adapted thresholds below take it for noise. Grain and encoder noise left on a still picture
  at analysis resolution stay far below ``BROAD_LUMA`` (5 luma levels for the heaviest still of the
  filter bench), and grain strong enough to reach it on a detailed picture is still small next to
  the picture's contrast; or
* *drift*: the block-averaged (``BLOCK`` x ``BLOCK``) mean absolute difference from the reference
  exceeds ``DRIFT_OVER_NOISE`` times the clip's own noise level (at least ``MIN_DRIFT``). The
  noise level is the 90th percentile of the block-averaged change between consecutive analysis
  frames, capped at ``MAX_NOISE``: grain and compression noise (including the jump a still
  picture makes at each key frame of a low-quality encode) are then below the bar, while motion
  keeps adding up past it.

Where the decoder says a key frame lies between two analysis frames (and key frames are rarer than
one step in ten: more frequent ones are already in the noise level), a drift alone does not count
(the encoder coded the still picture afresh: the "pumping" of low-quality encodes) and the
reference restarts there. ``frozen_ratio`` is the share of analysis steps without a change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ANALYSIS_WIDTH = 160  # analysis frames are this wide (height keeps the aspect ratio, even)
LIT_LUMA = 56.0  # a pixel this bright (limited range, 16 + 0.18 * 219) is lit content, not grain or noise
BLOCK = 8  # block side for the drift measure (noise averages out, coherent change stays)
SPARSE_LUMA = 40.0  # luma change of a pixel that is content, not noise
SPARSE_NOISE_K = 6.0  # ... or this many noise deviations of the difference, when that is larger
SPARSE_MAX_LUMA = 80.0  # cap of the noise-adapted sparse threshold
SPARSE_SHARE = 0.0003  # share of changed pixels that makes a frame changed (0.03 %: a few small lights)
BROAD_LUMA = 12.0  # mean absolute luma change no grain or encoder noise on a still picture reaches
BROAD_OVER_TEXTURE = 0.5  # ... and this share of the reference's contrast (std): the structure itself changed
DRIFT_OVER_NOISE = 2.0
MIN_DRIFT = 0.5  # luma levels: below this the block-averaged change is quantisation, not motion
KEY_SPARSE_FACTOR = 10.0
KEY_STEP_SHARE = 0.1  # key frames in more analysis steps than this are left to the noise level
MAX_NOISE = 4.0  # a block-averaged change above this between consecutive frames is content, not noise


def analysis_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) of the analysis frames for a video of ``width`` x ``height``."""
    w = min(ANALYSIS_WIDTH, max(2, width))
    h = max(2, round(height * w / max(1, width) / 2) * 2)
    return w, h


@dataclass(frozen=True)
class BlackParams:
    pixel_luma: float = 37.9  # blackdetect pix_th 0.10 over the limited range (16 + 0.10 * 219)
    picture_ratio: float = 0.98  # blackdetect picture_black_ratio_th
    lit_share: float = 0.0005  # this share of lit pixels makes a dark frame a picture


def is_black(frame: np.ndarray, params: BlackParams = BlackParams()) -> bool:
    """One analysis frame (luma, limited range) is black."""
    dark = float(np.mean(frame <= params.pixel_luma))
    if dark < params.picture_ratio:
        return False
    return float(np.mean(frame >= LIT_LUMA)) < params.lit_share


def black_ratio(frames: Sequence[np.ndarray], params: BlackParams = BlackParams()) -> float:
    if not frames:
        return 0.0
    return float(np.mean([is_black(f, params) for f in frames]))


def _blocks(d: np.ndarray) -> np.ndarray:
    h, w = d.shape
    bh, bw = max(1, h // BLOCK), max(1, w // BLOCK)
    if h < BLOCK or w < BLOCK:
        return d.reshape(1, 1, h, w).mean(axis=(2, 3))
    return d[: bh * BLOCK, : bw * BLOCK].reshape(bh, BLOCK, bw, BLOCK).mean(axis=(1, 3))


def drift(a: np.ndarray, b: np.ndarray) -> float:
    """Block-averaged mean absolute luma difference (noise averages out, coherent change stays)."""
    return float(np.abs(_blocks(b - a)).mean())


def sparse_change(a: np.ndarray, b: np.ndarray) -> float:
    """Share of pixels that changed by more than noise can explain."""
    d = np.abs(b - a)
    noise = 1.4826 * float(np.median(d))  # MAD-like deviation of the difference
    threshold = max(SPARSE_LUMA, min(SPARSE_NOISE_K * noise, SPARSE_MAX_LUMA))
    return float(np.mean(d > threshold))


def broad_change(a: np.ndarray, b: np.ndarray) -> bool:
    """The picture changed everywhere: a large mean change, large next to the reference's own contrast."""
    mean_change = float(np.abs(b - a).mean())
    return mean_change >= BROAD_LUMA and mean_change >= BROAD_OVER_TEXTURE * float(a.std())


def noise_level(frames: Sequence[np.ndarray]) -> float:
    """The clip's change floor: 90th percentile of consecutive block-averaged changes, capped."""
    if len(frames) < 2:
        return 0.0
    steps = [drift(a, b) for a, b in zip(frames[:-1], frames[1:])]
    return min(float(np.percentile(steps, 90)), MAX_NOISE)


def changed_steps(frames: Sequence[np.ndarray], key_steps: Sequence[bool] | None = None) -> list[bool]:
    """For each analysis step (frame i >= 1), whether the picture changed since the reference frame.

    ``key_steps[i]`` (optional, one per frame) says that a key frame was decoded between frames i-1
    and i: there the encoder coded the picture afresh, so a drift alone is compression noise, not
    a change; the reference restarts from that frame. A sparse change counts there only when it is
    large (``KEY_SPARSE_FACTOR`` times the usual share): a key frame of a low-quality encode
    re-codes sharp edges with a few strongly different pixels. Key
    frames more frequent than one step in ``KEY_STEP_SHARE`` are ignored: the noise level (a 90th
    percentile) then already holds their jumps, and a reference that restarts every other step
    would hide a slow pan.
    """
    if len(frames) < 2:
        return []
    if key_steps is not None and float(np.mean(list(key_steps[1:]) or [0.0])) > KEY_STEP_SHARE:
        key_steps = None
    bar = max(MIN_DRIFT, DRIFT_OVER_NOISE * noise_level(frames))
    ref = frames[0]
    out: list[bool] = []
    for i, f in enumerate(frames[1:], start=1):
        at_key = bool(key_steps is not None and i < len(key_steps) and key_steps[i])
        changed = sparse_change(ref, f) >= SPARSE_SHARE * (KEY_SPARSE_FACTOR if at_key else 1.0)
        changed = changed or broad_change(ref, f)
        if not changed and not at_key:
            changed = drift(ref, f) > bar
        out.append(changed)
        if changed or at_key:
            ref = f
    return out


def frozen_ratio(frames: Sequence[np.ndarray], key_steps: Sequence[bool] | None = None) -> float:
    """Share of analysis steps in which the picture did not change beyond its own noise."""
    steps = changed_steps(frames, key_steps)
    return float(1.0 - np.mean(steps)) if steps else 0.0
