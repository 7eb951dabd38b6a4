"""Extract: 16 kHz mono FLAC audio, N JPEG frames, optional clip mp4 and cheap quality signals.

Clips of the same video in a batch are served by one decode pass (PyAV, in-process): the
container is demuxed once from the first clip's start to the last clip's end, audio is
resampled to 16 kHz mono as it streams, frames are picked at their target times, and small luma
analysis frames at ``analysis_fps`` give brightness, black and frozen ratios (``stages._picture``:
black as a share of dark pixels with no lit content, frozen relative to the clip's own noise). A clip
mp4, when asked for, is cut with the ffmpeg CLI (re-encoded, so cuts are frame-accurate).

Media go to ``STAGING/clips/{video_id}/``; rows carry their paths, not the bytes.
"""

from __future__ import annotations

import logging
import math
import subprocess
from collections import defaultdict
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

from pipeline.config import ExtractConfig
from pipeline.errors import StageError
from pipeline.stage import Resources, Row, Stage
from pipeline.storage import StagingArea, localize
from stages._media import analysis_frame, main_video_stream, right_angle, stream_origin
from stages._picture import BlackParams, black_ratio, frozen_ratio

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
AUDIO_TOLERANCE = 0.25  # seconds of missing audio at a clip's end padded with silence (AAC priming)


def frame_targets(start: float, end: float, n: int, mode: str, shot_times: list[float]) -> list[float]:
    """Times of the frames to save for a clip."""
    if n <= 0:
        return []
    if mode == "per_shot":
        bounds = [start] + [t for t in sorted(shot_times) if start < t < end] + [end]
        mids = [(a + b) / 2 for a, b in zip(bounds[:-1], bounds[1:])]
        if len(mids) > n:
            mids = [mids[round(i * (len(mids) - 1) / (n - 1))] for i in range(n)] if n > 1 else [mids[0]]
        return mids
    step = (end - start) / n
    return [start + (i + 0.5) * step for i in range(n)]


def loudness(samples: np.ndarray, silence_db: float) -> tuple[float, float, float]:
    """(RMS dBFS, peak dBFS, fraction of 50 ms windows below ``silence_db``)."""
    if samples.size == 0:
        return -120.0, -120.0, 1.0
    x = samples.astype(np.float64)
    rms_db = 20 * math.log10(math.sqrt(float(np.mean(x * x))) + 1e-9)
    peak_db = 20 * math.log10(float(np.max(np.abs(x))) + 1e-9)
    win = SAMPLE_RATE // 20
    n = len(x) // win
    if n == 0:
        return rms_db, peak_db, float(rms_db < silence_db)
    w = x[: n * win].reshape(n, win)
    w_db = 20 * np.log10(np.sqrt(np.mean(w * w, axis=1)) + 1e-9)
    return max(rms_db, -120.0), max(peak_db, -120.0), float(np.mean(w_db < silence_db))


def write_flac(path: Path, samples: np.ndarray) -> None:
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)[None, :]
    tmp = path.with_suffix(".tmp.flac")
    with av.open(str(tmp), "w", format="flac") as out:
        stream = out.add_stream("flac", rate=SAMPLE_RATE, layout="mono")
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    tmp.replace(path)


def _scaled_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    short = min(width, height)
    if short <= short_side:
        return width - width % 2, height - height % 2
    scale = short_side / short
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


@dataclass
class _ClipWork:
    row: Row
    start: float
    end: float
    targets: list[float]
    out_dir: str  # relative to the staging area
    staging: StagingArea
    frames: dict[int, str] = field(default_factory=dict)
    frame_times: dict[int, float] = field(default_factory=dict)
    thumbs: list[np.ndarray] = field(default_factory=list)  # luma analysis frames (stages._picture)
    key_steps: list[bool] = field(default_factory=list)  # a key frame decoded since the previous thumb
    audio_done: bool = False
    audio: dict[str, Any] = field(default_factory=dict)
    error: StageError | None = None


class ExtractStage(Stage[ExtractConfig]):
    name = "extract"
    reads = ("key", "local_path", "clip_start", "clip_end", "has_video", "has_audio", "shot_times")
    writes = (
        "audio_uri", "frame_uris", "frame_times", "clip_uri", "audio_rms_db", "audio_peak_db",
        "silence_ratio", "brightness", "black_ratio", "frozen_ratio",
    )  # fmt: skip

    @property
    def resources(self) -> Resources:
        return Resources(cpus=1.0)

    @property
    def batch_size(self) -> int:
        return self.config.batch_size

    @property
    def staging(self) -> StagingArea:
        return StagingArea(self.context.staging_dir)

    def process_batch(self, rows: list[Row]) -> list[Any]:
        by_video: dict[str, list[int]] = defaultdict(list)
        for i, row in enumerate(rows):
            by_video[row["local_path"]].append(i)
        results: list[Any] = [None] * len(rows)
        for path, idxs in by_video.items():
            outs = self._extract_video(path, [rows[i] for i in idxs])
            for i, res in zip(idxs, outs, strict=True):
                results[i] = res
        return results

    # ------------------------------------------------------------------ one video

    def _extract_video(self, path: str, rows: list[Row]) -> list[Any]:
        cfg = self.config
        work: list[_ClipWork] = []
        for row in rows:
            out_dir = f"clips/{row['video_id']}"
            targets = (
                frame_targets(row["clip_start"], row["clip_end"], cfg.frames_per_clip, cfg.frame_mode,
                              row.get("shot_times") or [])
                if row.get("has_video") else []
            )  # fmt: skip
            work.append(_ClipWork(row, row["clip_start"], row["clip_end"], targets, out_dir, self.staging))
        try:
            path = str(localize(path))
            self._decode(path, work, any(r.get("has_video") for r in rows), any(r.get("has_audio") for r in rows))
        except StageError as exc:
            return [exc] * len(rows)
        results: list[Any] = []
        for w in work:
            if w.error is not None:
                results.append(w.error)
                continue
            try:
                results.append(self._finish(path, w))
            except StageError as exc:
                results.append(exc)
        return results

    def _decode(self, path: str, work: list[_ClipWork], want_video: bool, want_audio: bool) -> None:
        cfg = self.config
        t0 = min(w.start for w in work)
        t1 = max(w.end for w in work)
        try:
            container = av.open(path, metadata_errors="ignore")
        except av.error.FFmpegError as exc:
            raise StageError(f"cannot open {path}: {exc}", "corrupt_media") from None
        with container:
            vs = main_video_stream(container) if want_video else None  # never the cover art of an mp3
            aus = container.streams.audio[0] if want_audio and container.streams.audio else None
            origin = stream_origin(container)  # clip times count from the first timestamp (MPEG-TS: 1.4 s, or any)
            if vs is not None:
                vs.codec_context.thread_count = cfg.decode_threads
                if cfg.decode_threads != 1:
                    vs.thread_type = "AUTO"
                if cfg.skip_nonref_frames:
                    vs.codec_context.skip_frame = "NONREF"
            if t0 > 0.5:
                container.seek(int((origin + t0) * av.time_base), backward=True)
            streams = [s for s in (vs, aus) if s is not None]
            video = _VideoPicker(work, vs, cfg, t0, origin) if vs is not None else None
            audio = _AudioCollector(work, cfg.silence_db, origin) if aus is not None else None
            failed = False
            try:
                for packet in container.demux(*streams):
                    if packet.stream is vs and video is not None and not video.done:
                        for frame in packet.decode():
                            video.feed(frame, t1)
                    elif packet.stream is aus and audio is not None and not audio.done:
                        for frame in packet.decode():
                            audio.feed(frame)
                    if (video is None or video.done) and (audio is None or audio.done):
                        break
            except av.error.FFmpegError as exc:
                failed = True
                log.warning("extract %s: decoding stopped early: %s", path, exc)
            if audio is not None:
                audio.flush()
                if audio.origin is None and not failed:  # declared, but not one audio packet decoded
                    for w in work:
                        if w.row.get("has_audio") and w.error is None:
                            w.error = StageError("the audio stream holds no audio packets", "no_audio")
            if video is not None:
                video.finish()

    def _finish(self, path: str, w: _ClipWork) -> dict[str, Any]:
        cfg = self.config
        key = w.row["key"]
        out: dict[str, Any] = {}
        if w.targets:
            missing = [i for i in range(len(w.targets)) if i not in w.frames]
            if missing:
                raise StageError(
                    f"video ends before {w.targets[missing[0]]:.2f}s (truncated or damaged stream)", "corrupt_media"
                )
            out["frame_uris"] = [w.frames[i] for i in range(len(w.targets))]
            out["frame_times"] = [round(w.frame_times[i], 4) for i in range(len(w.targets))]
        if w.row.get("has_video"):
            if w.thumbs:
                means = np.array([t.mean() for t in w.thumbs])
                out["brightness"] = float(np.clip((np.mean(means) - 16.0) / 219.0, 0.0, 1.0))  # 0 black, 1 white
                params = BlackParams(cfg.black_pixel_luma, cfg.black_picture_ratio, cfg.black_lit_share)
                out["black_ratio"] = black_ratio(w.thumbs, params)
                out["frozen_ratio"] = frozen_ratio(w.thumbs, w.key_steps)
        if w.row.get("has_audio"):
            if not w.audio:
                raise StageError("audio stream ends before the clip (truncated or damaged)", "corrupt_media")
            out.update(w.audio)
        if cfg.write_clip_mp4:
            rel = f"{w.out_dir}/{key}.mp4"
            _cut_mp4(path, w.staging.local(rel), w.start, w.end)
            out["clip_uri"] = w.staging.publish(rel)
        return out


class _VideoPicker:
    """Saves frames at target times and keeps luma thumbnails at ``analysis_fps``."""

    def __init__(
        self, work: list[_ClipWork], stream: av.video.stream.VideoStream, cfg: ExtractConfig, t0: float, origin: float
    ) -> None:
        self.work = work
        self.origin = origin
        self.cfg = cfg
        self.done = False
        self.last_time = -1.0
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        self.half_frame = 0.5 / float(rate)
        self.targets = sorted(
            (t, ci, fi) for ci, w in enumerate(work) for fi, t in enumerate(w.targets)
        )
        self.next_target = 0
        self.step = 1.0 / cfg.analysis_fps
        self.next_probe = t0
        self.size: tuple[int, int] | None = None
        self.prev: tuple[av.VideoFrame, float] | None = None  # the last decoded frame and its time
        self.key_since_probe = False  # a key frame was decoded since the last analysis frame
        self.max_gap = 4 * self.half_frame  # how far past the last decoded frame a target may be

    def feed(self, frame: av.VideoFrame, t1: float) -> None:
        if frame.time is None:
            return
        t = frame.time - self.origin
        self.last_time = t
        if t >= t1 + self.half_frame:
            self.done = True
            return
        prev = self.prev
        while self.next_target < len(self.targets) and self.targets[self.next_target][0] <= t + self.half_frame:
            target, ci, fi = self.targets[self.next_target]
            self.next_target += 1
            # the nearest decoded frame: with non-reference frames skipped, frames can be 2-3 apart
            if prev is not None and target - prev[1] < t - target and self.work[ci].start - self.half_frame <= prev[1]:
                self._save(prev[0], self.work[ci], fi, prev[1])
            else:
                self._save(frame, self.work[ci], fi, t)
        self.prev = (frame, t)
        self.key_since_probe = self.key_since_probe or bool(frame.key_frame)
        if t + self.half_frame >= self.next_probe:
            thumb = analysis_frame(frame)
            for w in self.work:
                if w.start - self.half_frame <= t < w.end:
                    w.thumbs.append(thumb)
                    w.key_steps.append(self.key_since_probe)
            self.key_since_probe = False
            while self.next_probe <= t + self.half_frame:
                self.next_probe += self.step

    def _save(self, frame: av.VideoFrame, w: _ClipWork, index: int, t: float) -> None:
        if self.size is None:
            self.size = _scaled_size(frame.width, frame.height, self.cfg.frame_size)
        image = frame.reformat(width=self.size[0], height=self.size[1], format="rgb24").to_image()
        rotation = right_angle(frame.rotation)
        if rotation:  # display matrix (portrait phone video): frames come out as a player shows them
            image = image.rotate(rotation, expand=True)
        rel = f"{w.out_dir}/{w.row['key']}.{index}.jpg"
        image.save(w.staging.local(rel), format="JPEG", quality=self.cfg.jpeg_quality)
        w.frames[index] = w.staging.publish(rel)
        w.frame_times[index] = t

    def finish(self) -> None:
        """Targets up to two frames past the last decoded frame take that frame (the stream's
        last frames may be skipped non-reference ones); targets further out stay missing and
        ``ExtractStage._finish`` reports those clips as damaged."""
        if self.prev is None:
            return
        frame, t = self.prev
        while self.next_target < len(self.targets) and self.targets[self.next_target][0] <= t + self.max_gap:
            target, ci, fi = self.targets[self.next_target]
            self.next_target += 1
            if self.work[ci].start - self.half_frame <= t:
                self._save(frame, self.work[ci], fi, t)


class _AudioCollector:
    """Streams decoded audio to 16 kHz mono and completes clips as their end passes."""

    def __init__(self, work: list[_ClipWork], silence_db: float, origin: float = 0.0) -> None:
        self.stream_origin = origin
        self.pending = sorted((w for w in work if w.row.get("has_audio")), key=lambda w: w.end)
        self.silence_db = silence_db
        self.resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        self.chunks: list[np.ndarray] = []
        self.origin: float | None = None  # time of the first buffered sample
        self.buffered = 0
        self.done = not self.pending

    @property
    def end_time(self) -> float:
        return (self.origin or 0.0) + self.buffered / SAMPLE_RATE

    def feed(self, frame: av.AudioFrame) -> None:
        if self.origin is None:
            if frame.time is None:
                return
            self.origin = float(frame.time) - self.stream_origin
        for out in self.resampler.resample(frame):
            self._push(out.to_ndarray().reshape(-1))
        self._complete(final=False)

    def flush(self) -> None:
        if self.origin is not None:
            for out in self.resampler.resample(None):
                self._push(out.to_ndarray().reshape(-1))
        self._complete(final=True)

    def _push(self, samples: np.ndarray) -> None:
        self.chunks.append(samples.astype(np.float32, copy=False))
        self.buffered += len(samples)

    def _complete(self, final: bool) -> None:
        while self.pending and (final or self.pending[0].end <= self.end_time):
            w = self.pending.pop(0)
            self._emit(w)
        self.done = not self.pending
        if self.pending and self.chunks:
            self._trim(min(w.start for w in self.pending))

    def _emit(self, w: _ClipWork) -> None:
        if self.origin is None:
            return
        missing = w.end - self.end_time
        if missing > AUDIO_TOLERANCE:
            log.debug("extract %s: audio ends %.2fs before clip end", w.row["key"], missing)
            return  # _finish reports the clip as damaged
        buf = np.concatenate(self.chunks) if len(self.chunks) != 1 else self.chunks[0]
        self.chunks = [buf]
        a = max(0, round((w.start - self.origin) * SAMPLE_RATE))
        n = round((w.end - w.start) * SAMPLE_RATE)
        samples = buf[a : a + n]
        if len(samples) < n:
            samples = np.concatenate([samples, np.zeros(n - len(samples), np.float32)])
        rel = f"{w.out_dir}/{w.row['key']}.flac"
        write_flac(w.staging.local(rel), samples)
        rms_db, peak_db, silence = loudness(samples, self.silence_db)
        w.audio = {"audio_uri": w.staging.publish(rel), "audio_rms_db": rms_db, "audio_peak_db": peak_db, "silence_ratio": silence}

    def _trim(self, keep_from: float) -> None:
        assert self.origin is not None
        drop = int((keep_from - self.origin) * SAMPLE_RATE) - SAMPLE_RATE  # keep 1 s of slack
        if drop <= SAMPLE_RATE * 30:  # trim in big steps only
            return
        buf = np.concatenate(self.chunks)
        self.chunks = [buf[drop:]]
        self.buffered -= drop
        self.origin += drop / SAMPLE_RATE


def _cut_mp4(src: str, target: Path, start: float, end: float) -> str:
    tmp = target.with_suffix(".tmp.mp4")
    cmd = [
        "ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
        "-ss", f"{start:.3f}", "-i", src, "-t", f"{end - start:.3f}",
        "-map", "0:v:0?", "-map", "0:a:0?", "-c:v", "libx264", "-preset", "veryfast", "-crf", "23",
        "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "128k", "-movflags", "+faststart", str(tmp),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise StageError(f"ffmpeg could not cut the clip: {proc.stderr.strip()[-500:]}", "ffmpeg_failed")
    tmp.replace(target)
    return str(target)
