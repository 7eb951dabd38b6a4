"""Fingerprint: per-clip signals for dedup, computed on CPU from the decoded media.

Three signals per clip, stored on the row, and the time of each code:

* ``content_hash``: SHA-1 of the decoded media at low resolution: 16x16 luma thumbnails of the
  sampled frames quantised to 5 bits, or, for a clip without video, its 16 kHz audio quantised to
  8 bits. A byte copy or a re-muxed file (same streams, another container) gives the same hash;
  any re-encode does not (that is the perceptual signals' job). Audio is left out of the hash of
  a clip with video because a re-mux can move AAC priming samples and so shift the decoded audio.
* ``frame_hashes``: ``len(FRAME_SCALES)`` 64-bit hashes per sampled frame, frame after frame
  (``frames_per_second``, counted in decoded frames so it does not depend on container
  timestamps). The frame is reduced to luma, dark flat bars at its edges are cropped (letterbox /
  pillarbox), then for each scale a centred crop of the rest (100%, 90%: a copy cropped by ~10%
  matches the original's 90% hash) is resized to 32x32 and DCT-transformed; bit ``8*v+u`` is the
  sign of coefficient ``(v, u)`` of the 8x8 lowest frequencies (bit 0, the DC term, is always 0).
  Signs of AC coefficients do not change under brightness / contrast changes, and a mirror flip
  negates exactly the odd horizontal frequencies: ``mirror_hash(h) == h ^ MIRROR_MASK``, so dedup
  matches mirrored copies without storing a second hash.
  **Only frames with information vote**: a bit is only as good as its coefficient is far from
  zero, so a frame gets hashes only when at least ``FRAME_MIN_STRONG`` of its 63 AC coefficients
  reach ``FRAME_STRONG_COEF`` (luma units of the orthonormal DCT) and at least ``FRAME_MIN_COVER``
  of the picture stands out from its median. Flat, near-black and near-uniform frames, faint
  gradients and dark frames with a few small dots fail this: their sign bits are set by
  compression noise (or by where the dots happen to be), and such frames matched across
  unrelated videos.
  ``hash_times``: seconds from the clip start of each hashed frame.
* ``audio_fingerprint``: 64-bit codes every 32 ms in the manner of Haitsma & Kalker: log energies
  of 17 bands between 300 and 3400 Hz (256 ms windows, 16 ms hop); a 16-bit sub-fingerprint is the
  sign of the band-difference's change over 128 ms, and a code joins four of them 128 ms apart.
  **Only windows with information vote**: band energies are floored at ``AUDIO_BAND_FLOOR_DB``
  below the loudest band of the window and at -80 dBFS (empty bands are constant, not noise), the
  bands together must be louder than ``AUDIO_FLOOR_DB``, and a code is kept only when at least
  ``AUDIO_MIN_STRONG_BITS`` of its 64 bits come from a change of at least ``AUDIO_BIT_MARGIN``
  (natural-log energy). Silence, a constant tone or hum, and sound outside the bands give no code:
  such codes were all-zero-like and equal across unrelated clips. ``code_times``: seconds from
  the clip start of each kept code.

Each 64-bit code is stored as a signed int64 (two's complement) because Arrow/parquet have no
unsigned 64-bit list type that every reader handles; ``as_uint64`` converts back.
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Any

import av
import numpy as np

from pipeline.config import FingerprintConfig
from pipeline.errors import StageError
from pipeline.stage import Resources, Row, Stage, per_row
from pipeline.storage import localize

log = logging.getLogger(__name__)

DECODE_SIZE = 128  # frames are scaled to this square (luma) before cropping and hashing
HASH_SIZE = 32  # DCT input size
LOW = 8  # the LOW x LOW lowest DCT frequencies give the 64 bits
FLAT_ROW_STD = 6.0  # an edge row/column with less luma spread than this ...
BAR_MAX_LUMA = 56.0  # ... and darker than this (black bars survive a brightness lift)
MIN_FRAME_STD = 3.0  # frames flatter than this (after cropping) give no hash
FRAME_STRONG_COEF = 12.0  # an AC coefficient this large (orthonormal 32x32 DCT of luma) sets a reliable bit
FRAME_MIN_STRONG = 16  # frames with fewer reliable bits (of 63) carry too little information to vote
FRAME_COVER_LUMA = 10.0  # a 32x32 cell this far from the frame's median luma shows something ...
FRAME_MIN_COVER = 0.1  # ... and at least this share of cells must (a few dots on black do not)
EXACT_THUMB = 16
FRAME_SCALES = (1.0, 0.9)  # centred crops hashed per frame; frame_hashes holds them in this order

SAMPLE_RATE = 16000
AUDIO_WIN = 4096  # 256 ms: long windows make codes robust to a time shift of half a stride
AUDIO_HOP = 256
AUDIO_BANDS = 17
AUDIO_LO_HZ = 300.0
AUDIO_HI_HZ = 3400.0
AUDIO_DIFF = 8  # STFT hops between the frames a sub-fingerprint compares (128 ms)
AUDIO_STRIDE = 2  # STFT hops between consecutive codes (32 ms)
AUDIO_FLOOR_DB = -55.0  # windows quieter than this (dBFS RMS) give no code
AUDIO_BAND_FLOOR_DB = 40.0  # band energies floored this far below the window's loudest band
AUDIO_BIT_MARGIN = 0.35  # a bit is reliable when its band-difference change is at least this (ln energy)
_ABS_BAND_FLOOR = 10 ** (-80.0 / 10)  # band power (mean square) floor: -80 dBFS
AUDIO_MIN_STRONG_BITS = 24  # codes with fewer reliable bits (of 64) carry too little information to vote


def _mirror_mask() -> int:
    mask = 0
    for v in range(LOW):
        for u in range(1, LOW, 2):
            mask |= 1 << (v * LOW + u)
    return mask


MIRROR_MASK = _mirror_mask()


def as_int64(codes: np.ndarray) -> list[int]:
    """uint64 codes as Python ints in int64 range (the stored form)."""
    return np.asarray(codes, dtype=np.uint64).view(np.int64).tolist()


def as_uint64(values: list[int] | np.ndarray) -> np.ndarray:
    """Stored int64 codes back to uint64."""
    return np.asarray(values, dtype=np.int64).view(np.uint64)


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT = _dct_matrix(HASH_SIZE)
_BIT_WEIGHTS = (np.uint64(1) << np.arange(64, dtype=np.uint64)).astype(np.uint64)


def autocrop(gray: np.ndarray) -> np.ndarray:
    """Remove dark flat bars (letterbox, pillarbox) from the edges of a frame.

    Every flat dark edge row or column goes, also when it belongs to the picture (a dark
    background): the letterboxed copy loses the same picture rows, so both crop alike.
    """
    h, w = gray.shape
    row_bar = (gray.std(axis=1) < FLAT_ROW_STD) & (gray.mean(axis=1) < BAR_MAX_LUMA)
    col_bar = (gray.std(axis=0) < FLAT_ROW_STD) & (gray.mean(axis=0) < BAR_MAX_LUMA)

    def run(flags: np.ndarray) -> int:
        idx = np.flatnonzero(~flags)
        return int(idx[0]) if len(idx) else len(flags)

    top, bottom = run(row_bar), run(row_bar[::-1])
    left, right = run(col_bar), run(col_bar[::-1])
    if h - top - bottom < 8 or w - left - right < 8:
        return gray
    return gray[top : h - bottom, left : w - right]


def _resize(gray: np.ndarray, size: int) -> np.ndarray:
    """Area-average resize of a 2-D array to ``size`` x ``size``."""
    from PIL import Image

    img = Image.fromarray(gray.astype(np.float32), mode="F")
    return np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.float64)


def _low_dct(small: np.ndarray) -> np.ndarray:
    """The LOW x LOW lowest-frequency coefficients of the orthonormal 2-D DCT, flattened."""
    return (_DCT @ small @ _DCT.T)[:LOW, :LOW].reshape(-1)


def _dct_sign_hash(small: np.ndarray) -> int:
    bits = _low_dct(small) > 0
    bits[0] = False  # DC: brightness, not structure
    return int(np.sum(_BIT_WEIGHTS[bits], dtype=np.uint64))


def _information(small: np.ndarray) -> int:
    coef = np.abs(_low_dct(small))
    cover = float(np.mean(np.abs(small - np.median(small)) > FRAME_COVER_LUMA))
    return int(np.count_nonzero(coef[1:] >= FRAME_STRONG_COEF)) if cover >= FRAME_MIN_COVER else 0


def frame_information(gray: np.ndarray) -> int:
    """Reliable bits of a luma frame: AC coefficients (of 63) at least ``FRAME_STRONG_COEF`` in size.

    Measured on the bar-free picture at ``HASH_SIZE``; a textured picture has dozens, a flat or
    near-black frame none. 0 when less than ``FRAME_MIN_COVER`` of the picture differs from its
    median by ``FRAME_COVER_LUMA``: a few small dots on black set many coefficients but say little.
    """
    cropped = autocrop(np.asarray(gray, dtype=np.float32))
    if cropped.shape[0] < 8 or cropped.shape[1] < 8:
        return 0
    return _information(_resize(cropped, HASH_SIZE))


def frame_hash(gray: np.ndarray) -> tuple[int, ...] | None:
    """The ``len(FRAME_SCALES)`` 64-bit hashes of one luma frame (uint8 or float, any size).

    One per centred crop in ``FRAME_SCALES`` of the bar-free picture: a copy cropped by ~10%
    matches the original's 90% hash. None for a frame with too little information to recognise
    it by (flat, near-black, near-uniform, a smooth gradient: see :func:`frame_information`).
    """
    cropped = autocrop(np.asarray(gray, dtype=np.float32))
    if cropped.shape[0] < 8 or cropped.shape[1] < 8:
        return None
    out: list[int] = []
    h, w = cropped.shape
    for scale in FRAME_SCALES:
        dy, dx = round(h * (1 - scale) / 2), round(w * (1 - scale) / 2)
        small = _resize(cropped[dy : h - dy, dx : w - dx], HASH_SIZE)
        if small.std() < MIN_FRAME_STD:
            return None
        if scale == FRAME_SCALES[0] and _information(small) < FRAME_MIN_STRONG:
            return None
        bits = _low_dct(small) > 0
        bits[0] = False  # DC: brightness, not structure
        out.append(int(np.sum(_BIT_WEIGHTS[bits], dtype=np.uint64)))
    return tuple(out)


def mirror_hash(code: int) -> int:
    """The hash of the horizontally mirrored frame."""
    return code ^ MIRROR_MASK


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def _band_matrix() -> np.ndarray:
    freqs = np.fft.rfftfreq(AUDIO_WIN, 1.0 / SAMPLE_RATE)
    edges = np.geomspace(AUDIO_LO_HZ, AUDIO_HI_HZ, AUDIO_BANDS + 1)
    m = np.zeros((len(freqs), AUDIO_BANDS), np.float32)
    for b in range(AUDIO_BANDS):
        m[(freqs >= edges[b]) & (freqs < edges[b + 1]), b] = 1.0
    return m


def audio_codes_timed(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """64-bit codes (uint64) of 16 kHz mono float audio and their times (s, float32).

    One code per ``AUDIO_STRIDE`` hops (32 ms) of windows that carry information: loud enough,
    and with at least ``AUDIO_MIN_STRONG_BITS`` reliable bits (see the module docstring).
    """
    x = np.asarray(samples, dtype=np.float32)
    empty = np.zeros(0, np.uint64), np.zeros(0, np.float32)
    n_frames = 1 + (len(x) - AUDIO_WIN) // AUDIO_HOP if len(x) >= AUDIO_WIN else 0
    span = AUDIO_DIFF + 3 * AUDIO_DIFF  # frames one code needs: its 4 sub-fingerprints and their diffs
    if n_frames <= span:
        return empty
    frames = np.lib.stride_tricks.sliding_window_view(x, AUDIO_WIN)[::AUDIO_HOP][:n_frames]
    spec = np.abs(np.fft.rfft(frames * np.hanning(AUDIO_WIN).astype(np.float32), axis=1)) ** 2
    # band energies as mean-square power (Parseval: rfft keeps half the spectrum, Hann window)
    window = np.hanning(AUDIO_WIN)
    energy = (spec @ _band_matrix()).astype(np.float64) * 2.0 / (AUDIO_WIN * float(np.sum(window**2)))
    floor = np.maximum(energy.max(axis=1, keepdims=True) * 10 ** (-AUDIO_BAND_FLOOR_DB / 10), _ABS_BAND_FLOOR)
    log_e = np.log(np.maximum(energy, floor))  # empty bands are constant, not noise
    d = log_e[:, :-1] - log_e[:, 1:]  # (T, 16) spectral shape
    change = d[AUDIO_DIFF:] - d[:-AUDIO_DIFF]  # (T - DIFF, 16) its change over time
    sub = change > 0
    strong = np.abs(change) >= AUDIO_BIT_MARGIN
    band_db = 10 * np.log10(energy.sum(axis=1) + 1e-12)  # loudness inside 300-3400 Hz, dBFS
    loud = band_db[AUDIO_DIFF:] > AUDIO_FLOOR_DB  # a hum or tone below the bands leaves them empty
    starts = np.arange(0, len(sub) - 3 * AUDIO_DIFF, AUDIO_STRIDE)
    if len(starts) == 0:
        return empty
    bits = np.concatenate([sub[starts + j * AUDIO_DIFF] for j in range(4)], axis=1)  # (n, 64)
    n_strong = sum(strong[starts + j * AUDIO_DIFF].sum(axis=1) for j in range(4))
    ok = np.all(np.stack([loud[starts + j * AUDIO_DIFF] for j in range(4)]), axis=0)
    ok &= n_strong >= AUDIO_MIN_STRONG_BITS
    codes = (bits.astype(np.uint64) * _BIT_WEIGHTS[None, :]).sum(axis=1, dtype=np.uint64)
    times = (starts * AUDIO_HOP / SAMPLE_RATE).astype(np.float32)
    return codes[ok], times[ok]


def audio_codes(samples: np.ndarray) -> np.ndarray:
    """64-bit codes (uint64) of 16 kHz mono float audio, one per 32 ms with information in it."""
    return audio_codes_timed(samples)[0]


def read_audio(uri: str) -> np.ndarray:
    """Decode an audio file (extract's 16 kHz mono FLAC) to float32 samples at 16 kHz mono."""
    chunks: list[np.ndarray] = []
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    try:
        with av.open(uri) as container:
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except (av.error.FFmpegError, IndexError) as exc:
        raise StageError(f"cannot decode audio {uri}: {exc}", "corrupt_media") from None
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


def sample_frames(path: str, start: float, end: float, per_second: float, max_frames: int) -> list[np.ndarray]:
    """Luma frames (DECODE_SIZE square, uint8) of [start, end): every k-th decoded frame."""
    return [f for _, f in sample_frames_timed(path, start, end, per_second, max_frames)]


def sample_frames_timed(
    path: str, start: float, end: float, per_second: float, max_frames: int
) -> list[tuple[float, np.ndarray]]:
    """(seconds from ``start``, luma frame) of [start, end): every k-th decoded frame.

    ``k`` gives ``per_second`` frames per second, or fewer so that at most ``max_frames`` cover
    the whole clip. Frames are picked by decoded count (not container timestamps); their times are
    the decoder's, which dedup uses to check that matches line up in time.
    """
    out: list[tuple[float, np.ndarray]] = []
    try:
        container = av.open(path, metadata_errors="ignore")
    except av.error.FFmpegError as exc:
        raise StageError(f"cannot open {path}: {exc}", "corrupt_media") from None
    with container:
        if not container.streams.video:
            return out
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate or stream.guessed_rate or 25)
        stride = max(1, round(rate / per_second))
        if math.isfinite(end):  # a long clip: spread max_frames over all of it
            stride = max(stride, math.ceil((end - start) * rate / max_frames))
        if start > 0.5:
            container.seek(int(start * av.time_base), backward=True)
        half = 0.5 / rate
        index = 0
        try:
            for frame in container.decode(stream):
                t = frame.time
                if t is None or t < start - half:
                    continue
                if t >= end - half or len(out) >= max_frames:
                    break
                if index % stride == 0:
                    gray = frame.reformat(width=DECODE_SIZE, height=DECODE_SIZE, format="gray")
                    out.append((float(t) - start, gray.to_ndarray()[:, :DECODE_SIZE].copy()))
                index += 1
        except av.error.FFmpegError as exc:
            log.warning("fingerprint %s: decoding stopped early: %s", path, exc)
    return out


def content_hash(frames: list[np.ndarray], audio: np.ndarray | None) -> str:
    """SHA-1 of low-resolution decoded media (frames; audio only without frames).

    Identical for byte copies and re-muxed files.
    """
    h = hashlib.sha1()
    if frames:
        h.update(b"frames")
        for f in frames:
            thumb = _resize(f, EXACT_THUMB)
            h.update((np.clip(np.round(thumb), 0, 255).astype(np.uint8) >> 3).tobytes())
    elif audio is not None:
        h.update(b"audio")
        h.update((np.clip(audio, -1.0, 1.0) * 127).round().astype(np.int8).tobytes())
    return h.hexdigest()


class FingerprintStage(Stage[FingerprintConfig]):
    """Compute ``content_hash``, ``frame_hashes`` / ``hash_times`` and ``audio_fingerprint`` / ``code_times``."""

    name = "fingerprint"
    reads = ("local_path", "clip_start", "clip_end", "has_video", "has_audio", "audio_uri")
    writes = ("content_hash", "frame_hashes", "hash_times", "audio_fingerprint", "code_times")

    @property
    def resources(self) -> Resources:
        return Resources(cpus=1.0)

    @property
    def batch_size(self) -> int:
        return self.config.batch_size

    def process_batch(self, rows: list[Row]) -> list[Any]:
        return per_row(self.fingerprint, rows)

    def fingerprint(self, row: Row) -> dict[str, Any]:
        cfg = self.config
        timed: list[tuple[float, np.ndarray]] = []
        if row.get("has_video"):
            path = row.get("local_path")
            if not path:
                raise StageError("no local file to fingerprint (download stage missing?)", "missing_input")
            start = float(row.get("clip_start") or 0.0)
            end = float(row["clip_end"]) if row.get("clip_end") is not None else float("inf")
            timed = sample_frames_timed(str(localize(path)), start, end, cfg.frames_per_second, cfg.max_frames)
            if not timed:
                raise StageError(f"no decodable frames in [{start:.2f}, {end:.2f}) of {path}", "corrupt_media")
        audio: np.ndarray | None = None
        if row.get("has_audio") and cfg.audio:
            uri = row.get("audio_uri")
            if not uri:
                raise StageError("no audio_uri to fingerprint (run extract before fingerprint)", "missing_input")
            audio = read_audio(str(localize(uri)))
        frames = [f for _, f in timed]
        hashes: list[int] = []
        times: list[float] = []
        for t, f in timed:
            h = frame_hash(f)
            if h is not None:
                hashes.extend(h)
                times.append(round(t, 3))
        codes, code_times = audio_codes_timed(audio) if audio is not None else (np.zeros(0, np.uint64), np.zeros(0))
        return {
            "content_hash": content_hash(frames, audio) if frames or audio is not None else None,
            "frame_hashes": as_int64(np.array(hashes, dtype=np.uint64)),
            "hash_times": times,
            "audio_fingerprint": as_int64(codes),
            "code_times": np.round(code_times, 3).tolist(),
        }
