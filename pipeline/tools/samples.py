"""Synthetic audio-visual media with known ground truth, made offline.

Tests, demos and benchmarks need real media files (h264/AAC mp4s that every decoder in the pipeline
opens) whose content is known exactly: where the scene cuts are, what is said and when. This module
makes them with the ``ffmpeg`` lavfi sources and ``espeak-ng``; nothing is downloaded.

- :func:`synth_video` writes one mp4 (or an audio-only m4a/mp4) of ``n_scenes`` visually distinct
  scenes (testsrc2, SMPTE bars, a zooming Mandelbrot, Game of Life, cellular automata, moving
  gradients, a moving box, a panned test pattern, ...) joined by hard cuts at frame-exact times, with
  espeak-ng sentences placed at known times over a quiet pink-noise/hum bed or a synthetic melody.
  One ffmpeg call per video (speech WAVs are rendered first), ~0.3-1 s for 8 s at 320x240.
- :func:`generate_corpus` writes a small varied corpus plus ``manifest.jsonl`` and ``inputs.txt``.
- :func:`make_bad_inputs` writes the broken files a real crawl meets (empty, HTML, random bytes,
  truncated, audio-only, video without audio, too short).
- :func:`synth_speech_wav` renders one sentence to a mono WAV for ASR tests.

Everything is deterministic for a seed: the same arguments give the same cut times, sentences and
placements (and, with the bit-exact flags used here, the same bytes for a given ffmpeg build).
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import subprocess
import tempfile
import wave
from array import array
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "SENTENCES",
    "SCENE_KINDS",
    "SampleVideo",
    "SynthesisError",
    "synth_video",
    "generate_corpus",
    "make_bad_inputs",
    "synth_speech_wav",
]

#: Varied, realistic English sentences; :func:`synth_video` picks from these when ``speech`` is None.
SENTENCES: tuple[str, ...] = (
    "Welcome back to the channel, today we are building a wooden bookshelf from scratch.",
    "First, measure the length of the board and mark it with a pencil.",
    "The weather tomorrow will be sunny in the morning with light rain in the evening.",
    "Add two cups of flour and a pinch of salt, then stir until the dough is smooth.",
    "The train to the city center leaves from platform four every twenty minutes.",
    "Our team scored in the last minute of the game and the crowd went wild.",
    "Please remember to save your work before closing the application.",
    "This small bird builds its nest from grass, feathers and pieces of moss.",
    "Turn left at the second traffic light and the museum is on your right.",
    "The new phone has a larger battery and a brighter screen than last year's model.",
    "Let the sauce simmer gently for ten minutes while you chop the vegetables.",
    "Scientists have discovered a new species of frog in the rainforest.",
    "If the engine makes a strange noise, check the oil level first.",
    "The library is open from nine in the morning until eight at night.",
    "Thank you for watching, and don't forget to subscribe for more videos.",
    "The river flows slowly through the valley before it reaches the sea.",
    "Tighten each screw a little at a time so the frame stays straight.",
    "In the second half of the lecture we will look at the results of the experiment.",
    "The guitar is tuned a half step down for this song.",
    "A strong wind is blowing across the bay and the boats are heading back to the harbor.",
    "Water the plants early in the morning so the leaves can dry during the day.",
    "The market sells fresh bread, local cheese and apples from the nearby farms.",
    "Press the red button to start the recording and press it again to stop.",
    "Children in the village walk two miles to school every day.",
    "The painting was finished in eighteen ninety and hangs in the main hall.",
    "Keep your elbows close to your body and breathe out as you lift the weight.",
    "The airport will be closed tonight because of heavy snow.",
    "Mix the blue and yellow paint to get a soft shade of green.",
    "Our guest today is a chef who has cooked in restaurants all over the world.",
    "The bridge was built more than one hundred years ago and is still in use.",
    "Cats sleep for up to sixteen hours a day.",
    "Now slowly pour the hot water over the coffee grounds in a circle.",
    "The concert starts at seven, so we should leave the house by six.",
    "Use a soft brush to remove the dust before you apply the varnish.",
    "The mountain trail is steep, but the view from the top is worth it.",
    "In this video I will show you three easy ways to fold a shirt.",
    "The store is having a sale on winter jackets this weekend.",
    "Set the oven to two hundred degrees and bake the bread for half an hour.",
    "The spacecraft will reach the orbit of Mars in about seven months.",
    "Lower the sail and steer the boat into the wind.",
    "Hello and welcome.",
    "Let's get started.",
    "That looks delicious.",
    "Watch this carefully.",
)

#: Scene kinds understood by :func:`synth_video` (``scene_kinds=``). Kinds in the same family look
#: alike and are never placed next to each other when chosen at random.
SCENE_KINDS: dict[str, str] = {
    "testsrc2": "testsrc",
    "pan": "testsrc",  # testsrc2 scrolled quickly: simulated camera pan, lots of motion
    "smptebars": "bars",
    "rgbtestsrc": "bars",
    "colorspectrum": "spectrum",
    "mandelbrot": "fractal",
    "sierpinski": "fractal",
    "life": "automaton",
    "cellauto": "automaton",
    "gradients": "gradients",
    "movingbox": "box",
}

_BED_AMPLITUDE = 0.012  # pink noise bed (speech peaks near full scale)
_HUM_AMPLITUDE = 0.006
_MUSIC_AMPLITUDE = 0.08
_MIN_SCENE_SECONDS = 1.5
_AUDIO_RATE = 48000
_PENTATONIC = (0, 2, 4, 7, 9, 12, 14, 16)  # semitones above the root


class SynthesisError(RuntimeError):
    """ffmpeg or espeak-ng failed while making a sample."""


@dataclass
class SampleVideo:
    """One synthetic media file and its ground truth."""

    id: str
    path: Path
    duration: float
    cut_times: list[float] = field(default_factory=list)
    transcript: str = ""
    sentences: list[dict[str, Any]] = field(default_factory=list)
    width: int = 0
    height: int = 0
    fps: float = 0.0
    has_audio: bool = True
    has_video: bool = True
    scene_kinds: list[str] = field(default_factory=list)
    music: bool = False
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``path`` as a string)."""
        d = asdict(self)
        d["path"] = str(self.path)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], base_dir: Path | None = None) -> SampleVideo:
        """Inverse of :meth:`to_dict`; a relative ``path`` is resolved against ``base_dir``."""
        kw = dict(d)
        p = Path(kw["path"])
        if base_dir is not None and not p.is_absolute():
            p = base_dir / p
        kw["path"] = p
        return cls(**kw)


# --------------------------------------------------------------------------------------------
# binaries


def _require(binary: str) -> str:
    exe = shutil.which(binary)
    if exe is None:
        pkg = {"ffmpeg": "ffmpeg", "ffprobe": "ffmpeg", "espeak-ng": "espeak-ng"}.get(binary, binary)
        raise RuntimeError(
            f"'{binary}' was not found on PATH; install it (e.g. `apt-get install {pkg}`) "
            "to synthesise sample media"
        )
    return exe


def _run(cmd: list[str], *, what: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    logger.debug("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, input=stdin, capture_output=True, check=False)
    if proc.returncode != 0:
        tail = proc.stderr.decode("utf-8", "replace")[-2000:]
        raise SynthesisError(f"{what} failed (exit {proc.returncode}): {tail}")
    return proc


def _probe_duration(path: Path) -> float:
    proc = _run(
        [_require("ffprobe"), "-v", "error", "-show_entries", "format=duration", "-of", "json", str(path)],
        what=f"ffprobe {path}",
    )
    info = json.loads(proc.stdout or b"{}")
    try:
        return float(info["format"]["duration"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SynthesisError(f"ffprobe gave no duration for {path}") from exc


# --------------------------------------------------------------------------------------------
# speech


def _espeak(text: str, out_wav: Path, *, voice: str = "en-us", speed: int = 165, pitch: int = 50) -> None:
    # Text goes through stdin so that text starting with '-' is never read as an option.
    _run(
        [_require("espeak-ng"), "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdin", "-w", str(out_wav)],
        what="espeak-ng",
        stdin=text.encode("utf-8"),
    )


def _wav_info(path: Path) -> tuple[float, float, float]:
    """(duration, voiced onset, voiced offset) in seconds of a 16-bit PCM WAV.

    Onset/offset are the first/last 10 ms window whose peak exceeds 3 % of full scale, so sentence
    times in the ground truth exclude espeak's leading/trailing silence.
    """
    with wave.open(str(path), "rb") as w:
        rate, n, ch, width = w.getframerate(), w.getnframes(), w.getnchannels(), w.getsampwidth()
        raw = w.readframes(n)
    duration = n / rate
    if width != 2:
        return duration, 0.0, duration
    samples = array("h")
    samples.frombytes(raw)
    if ch > 1:
        samples = samples[::ch]
    win = max(1, rate // 100)
    thr = int(0.03 * 32767)
    voiced = [
        i for i in range(0, len(samples), win) if max(max(samples[i : i + win]), -min(samples[i : i + win])) > thr
    ]
    if not voiced:
        return duration, 0.0, 0.0
    return duration, voiced[0] / rate, min(duration, (voiced[-1] + win) / rate)


def synth_speech_wav(path: Path, text: str, rate_hz: int = 16000) -> float:
    """Speak ``text`` with espeak-ng into a mono 16-bit WAV at ``rate_hz``; return its duration (s)."""
    if not text.strip():
        raise ValueError("text is empty")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="avforge_tts_") as tmp:
        raw = Path(tmp) / "raw.wav"
        _espeak(text, raw)
        _run(
            [_require("ffmpeg"), "-hide_banner", "-loglevel", "error", "-y", "-i", str(raw),
             "-ac", "1", "-ar", str(rate_hz), "-c:a", "pcm_s16le", "-fflags", "+bitexact", str(path)],
            what="ffmpeg resample",
        )
    with wave.open(str(path), "rb") as w:
        return w.getnframes() / w.getframerate()


# --------------------------------------------------------------------------------------------
# video scenes


def _color(rng: random.Random) -> str:
    return f"0x{rng.randrange(256):02x}{rng.randrange(256):02x}{rng.randrange(256):02x}"


def _scene_chain(kind: str, rng: random.Random, w: int, h: int, rate: str, n_frames: int) -> str:
    """A filtergraph chain (no labels) that produces exactly ``n_frames`` frames of one scene."""
    hue = rng.randrange(360)
    sz = f"s={w}x{h}:r={rate}"
    if kind == "testsrc2":
        src = f"testsrc2={sz},hue=h={hue}"
    elif kind == "pan":
        hs, vs = rng.uniform(0.01, 0.03), rng.uniform(-0.02, 0.02)
        src = f"testsrc2={sz},scroll=h={hs:.4f}:v={vs:.4f},hue=h={hue}"
    elif kind == "smptebars":
        src = f"smptebars={sz},hue=h={hue}:s={rng.uniform(0.6, 1.4):.2f}"
    elif kind == "rgbtestsrc":
        src = f"rgbtestsrc={sz},hue=h={hue}"
    elif kind == "colorspectrum":
        src = f"colorspectrum={sz}:type={rng.choice(['black', 'white', 'all'])},hue=h={hue}"
    elif kind == "mandelbrot":
        src = (
            f"mandelbrot={sz}:maxiter=64:start_scale={rng.uniform(2.0, 3.5):.3f}:"
            f"end_scale={rng.uniform(0.05, 0.3):.3f}:end_pts={rng.uniform(6, 20):.1f},hue=h={hue}"
        )
    elif kind == "sierpinski":
        r, g, b = (round(rng.uniform(0.2, 1.0), 2) for _ in range(3))
        src = (
            f"sierpinski={sz}:seed={rng.randrange(1 << 30)}:jump={rng.randrange(50, 150)}:"
            f"type={rng.choice(['carpet', 'triangle'])},format=rgb24,colorchannelmixer=rr={r}:gg={g}:bb={b}"
        )
    elif kind == "life":
        src = (
            f"life={sz}:seed={rng.randrange(1 << 30)}:ratio={rng.uniform(0.1, 0.4):.2f}:mold={rng.randrange(0, 30)}:"
            f"life_color={_color(rng)}:death_color={_color(rng)}:mold_color={_color(rng)}"
        )
    elif kind == "cellauto":
        rule = rng.choice([18, 30, 45, 73, 90, 105, 110, 150])
        r, g, b = (round(rng.uniform(0.2, 1.0), 2) for _ in range(3))
        src = (
            f"cellauto={sz}:rule={rule}:seed={rng.randrange(1 << 30)}:ratio={rng.uniform(0.3, 0.7):.2f},"
            f"format=rgb24,colorchannelmixer=rr={r}:gg={g}:bb={b}"
        )
    elif kind == "gradients":
        src = (
            f"gradients={sz}:c0={_color(rng)}:c1={_color(rng)}:c2={_color(rng)}:nb_colors=3:"
            f"seed={rng.randrange(1 << 30)}:speed={rng.uniform(0.01, 0.05):.3f}"
        )
    elif kind == "movingbox":
        bw = max(8, (min(w, h) // rng.randrange(3, 6)) // 2 * 2)
        vx, vy, ph = rng.uniform(60, 200), rng.uniform(1.5, 4.0), rng.uniform(0, 6.28)
        bg = _color(rng)
        fg = f"0x{0xFFFFFF ^ int(bg, 16):06x}"  # complementary colour: the box always stands out
        # two colour sources composed with overlay; the box bounces horizontally and bobs vertically
        return (
            f"color=c={bg}:{sz}[bg_{{i}}];color=c={fg}:s={bw}x{bw}:r={rate}[fg_{{i}}];"
            f"[bg_{{i}}][fg_{{i}}]overlay=x='abs(mod(t*{vx:.1f},2*(W-w))-(W-w))':"
            f"y='(H-h)/2+(H-h)/2*sin(t*{vy:.2f}+{ph:.2f})':shortest=1,trim=end_frame={n_frames},setpts=PTS-STARTPTS"
        )
    else:
        raise ValueError(f"unknown scene kind {kind!r}; choose from {sorted(SCENE_KINDS)}")
    return f"{src},trim=end_frame={n_frames},setpts=PTS-STARTPTS"


def _pick_kinds(rng: random.Random, n: int) -> list[str]:
    kinds: list[str] = []
    names = sorted(SCENE_KINDS)
    for _ in range(n):
        prev_family = SCENE_KINDS[kinds[-1]] if kinds else None
        choices = [k for k in names if SCENE_KINDS[k] != prev_family and k not in kinds[-3:]]
        kinds.append(rng.choice(choices))
    return kinds


def _scene_lengths(rng: random.Random, total_frames: int, n_scenes: int, fps: float) -> list[int]:
    if n_scenes == 1:
        return [total_frames]
    min_frames = math.ceil(_MIN_SCENE_SECONDS * fps - 1e-9)
    spare = total_frames - n_scenes * min_frames
    if spare < 0:
        raise ValueError(
            f"{n_scenes} scenes of at least {_MIN_SCENE_SECONDS} s do not fit in {total_frames / fps:.2f} s"
        )
    points = sorted(rng.randint(0, spare) for _ in range(n_scenes - 1))
    extras = [b - a for a, b in zip([0, *points], [*points, spare])]
    return [min_frames + e for e in extras]


# --------------------------------------------------------------------------------------------
# audio


def _melody_expr(rng: random.Random) -> str:
    root = rng.choice([196.0, 220.0, 246.94, 261.63, 293.66])
    notes = [root * 2 ** (rng.choice(_PENTATONIC) / 12) for _ in range(8)]
    bps = rng.choice([2.0, 2.5, 3.0])  # notes per second
    freq = f"{notes[-1]:.2f}"
    for i in range(len(notes) - 2, -1, -1):
        freq = f"if(eq(mod(floor(t*{bps}),8),{i}),{notes[i]:.2f},{freq})"
    # sin(pi*phase) envelope is zero at note boundaries (no clicks); a bass drone under the melody
    env = f"sin(PI*mod(t*{bps},1))*exp(-2*mod(t*{bps},1))"
    lead = f"{env}*(sin(2*PI*({freq})*t)+0.3*sin(4*PI*({freq})*t))"
    bass = f"0.35*sin(2*PI*{root / 2:.2f}*t)"
    return f"{_MUSIC_AMPLITUDE:.3f}*({lead}+{bass})"


def _place_sentences(
    rng: random.Random, infos: list[tuple[str, Path, float, float, float]], duration: float, user_given: bool
) -> list[tuple[str, Path, float, float, float, float]]:
    """Place sentences in order with random gaps; (text, wav, dur, delay, voiced_start, voiced_end) each."""
    lead, tail, gap = 0.3, 0.2, 0.25
    kept = list(infos)
    while kept and lead + tail + sum(i[2] for i in kept) + gap * (len(kept) - 1) > duration:
        dropped = kept.pop()
        log = logger.warning if user_given else logger.debug
        log("sentence %r (%.2f s) does not fit in %.2f s; dropped", dropped[0], dropped[2], duration)
    if not kept:
        return []
    spare = duration - lead - tail - sum(i[2] for i in kept) - gap * (len(kept) - 1)
    cuts = sorted(rng.uniform(0, spare) for _ in range(len(kept)))  # cumulative extra silence
    placed = []
    t = lead
    prev = 0.0
    for (text, wav, dur, on, off), c in zip(kept, cuts):
        t += c - prev
        prev = c
        placed.append((text, wav, dur, round(t, 3), round(t + on, 3), round(t + off, 3)))
        t += dur + gap
    return placed


# --------------------------------------------------------------------------------------------
# public API


def synth_video(
    path: Path,
    *,
    duration: float = 8.0,
    n_scenes: int = 3,
    speech: list[str] | None = None,
    width: int = 320,
    height: int = 240,
    fps: float = 25.0,
    audio: bool = True,
    video: bool = True,
    seed: int = 0,
    music: bool = False,
    scene_kinds: Sequence[str] | None = None,
) -> SampleVideo:
    """Write a synthetic video with known cuts and speech; return its ground truth.

    Args:
        path: output file (.mp4, or .m4a for audio-only).
        duration: length in seconds; the video is ``round(duration * fps)`` frames long.
        n_scenes: number of scenes joined by hard cuts (each at least 1.5 s when there are several;
            ``ValueError`` if they cannot fit).
        speech: sentences to speak in order; ``None`` picks ~one per 3.5 s from :data:`SENTENCES`,
            ``[]`` means no speech. Sentences that do not fit are dropped (with a warning); ignored
            when ``audio`` is False.
        width, height: frame size (even numbers, yuv420p).
        fps: frame rate.
        audio: write an AAC stereo 48 kHz track (speech over a pink-noise/hum bed, or a melody).
        video: write an h264 track; ``False`` gives an audio-only file.
        seed: everything random (scene kinds, cut times, colours, sentences, voices) derives from it.
        music: use a synthetic tonal melody instead of the noise/hum bed under the speech.
        scene_kinds: force the kind of each scene (see :data:`SCENE_KINDS`); length must be n_scenes.
    """
    if not (audio or video):
        raise ValueError("a sample needs at least one of audio or video")
    if duration <= 0 or fps <= 0 or n_scenes < 1:
        raise ValueError("duration and fps must be positive and n_scenes >= 1")
    if width % 2 or height % 2 or width < 16 or height < 16:
        raise ValueError(f"width and height must be even and >= 16, got {width}x{height}")
    if scene_kinds is not None and len(scene_kinds) != n_scenes:
        raise ValueError(f"scene_kinds has {len(scene_kinds)} entries, n_scenes is {n_scenes}")
    ffmpeg = _require("ffmpeg")
    _require("ffprobe")
    if audio:
        _require("espeak-ng")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # separate streams of randomness: switching audio on/off never changes the pictures and vice versa
    rng = random.Random(f"avforge-sample-{seed}-video")
    arng = random.Random(f"avforge-sample-{seed}-audio")
    rate = Fraction(fps).limit_denominator(1001)
    total_frames = max(1, round(duration * fps))
    true_len = float(total_frames / rate) if video else duration

    # ---- video plan
    lengths: list[int] = []
    kinds: list[str] = []
    cut_times: list[float] = []
    if video:
        lengths = _scene_lengths(rng, total_frames, n_scenes, float(rate))
        kinds = list(scene_kinds) if scene_kinds is not None else _pick_kinds(rng, n_scenes)
        acc = 0
        for n in lengths[:-1]:
            acc += n
            cut_times.append(round(float(acc / rate), 6))

    # ---- speech plan
    voice = arng.choice(["en-us", "en-gb", "en-us+f3", "en-us+m3", "en-gb+f2", "en-us+m7"])
    speed, pitch = arng.randrange(150, 185), arng.randrange(35, 65)  # words per minute, 0-99
    if speech is None:
        # about one sentence per 3.5 s, drawn at random among those whose estimated length still fits
        want = max(1, round(true_len / 3.5))
        budget = true_len - 0.5
        texts = []
        for text in arng.sample(SENTENCES, len(SENTENCES)):
            est = len(text.split()) * 60.0 / speed + 0.25  # espeak speaks ~`speed` words/min
            if est <= budget:
                texts.append(text)
                budget -= est
            if len(texts) == want:
                break
    else:
        texts = [s for s in speech if s.strip()]

    cmd: list[str] = [ffmpeg, "-hide_banner", "-loglevel", "error", "-nostdin", "-y"]
    graph: list[str] = []
    maps: list[str] = []
    placed: list[tuple[str, Path, float, float, float, float]] = []

    with tempfile.TemporaryDirectory(prefix="avforge_synth_") as tmp:
        if audio and texts:
            infos = []
            for j, text in enumerate(texts):
                wav = Path(tmp) / f"s{j}.wav"
                _espeak(text, wav, voice=voice, speed=speed, pitch=pitch)
                infos.append((text, wav, *_wav_info(wav)))
            placed = _place_sentences(arng, infos, true_len, user_given=speech is not None)
            for _text, wav, *_rest in placed:
                cmd += ["-i", str(wav)]

        if video:
            labels = []
            for i, (kind, n) in enumerate(zip(kinds, lengths)):
                chain = _scene_chain(kind, rng, width, height, str(rate), n).replace("{i}", str(i))
                graph.append(f"{chain}[v{i}]")
                labels.append(f"[v{i}]")
            if len(labels) > 1:
                graph.append(f"{''.join(labels)}concat=n={len(labels)}:v=1:a=0,format=yuv420p[vout]")
            else:
                graph.append(f"{labels[0]}format=yuv420p[vout]")
            maps += ["-map", "[vout]"]

        if audio:
            d = f"{true_len:.6f}"
            if music:
                graph.append(f"aevalsrc=exprs='{_melody_expr(arng)}':s={_AUDIO_RATE}:d={d}[bed]")
            else:
                noise_seed, hum_hz = arng.randrange(1 << 30), arng.choice([50, 60])
                graph.append(
                    f"anoisesrc=color=pink:amplitude={_BED_AMPLITUDE}:seed={noise_seed}:r={_AUDIO_RATE}:d={d}[noise];"
                    f"sine=f={hum_hz}:r={_AUDIO_RATE}:d={d},volume={_HUM_AMPLITUDE / 0.125:.4f}[hum];"
                    "[noise][hum]amix=inputs=2:duration=first:normalize=0[bed]"
                )
            mix_in = ["[bed]"]
            for j, (_t, _w, _dur, delay, _on, _off) in enumerate(placed):
                graph.append(f"[{j}:a]aresample={_AUDIO_RATE},adelay=delays={round(delay * 1000)}:all=1[sp{j}]")
                mix_in.append(f"[sp{j}]")
            graph.append(
                f"{''.join(mix_in)}amix=inputs={len(mix_in)}:duration=first:normalize=0,"
                f"atrim=end={d},aformat=sample_rates={_AUDIO_RATE}:channel_layouts=stereo[aout]"
            )
            maps += ["-map", "[aout]"]

        cmd += ["-filter_complex", ";".join(graph), *maps]
        if video:
            cmd += ["-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p", "-r", str(rate)]
        if audio:
            cmd += ["-c:a", "aac", "-b:a", "96k", "-ar", str(_AUDIO_RATE), "-ac", "2"]
        cmd += ["-map_metadata", "-1", "-fflags", "+bitexact", "-movflags", "+faststart", str(path)]
        _run(cmd, what=f"ffmpeg synth {path.name}")

    sentences = [{"text": t, "start": on, "end": off} for t, _w, _d, _delay, on, off in placed]
    sample = SampleVideo(
        id=path.stem,
        path=path,
        duration=round(_probe_duration(path), 3),
        cut_times=cut_times,
        transcript=" ".join(s["text"] for s in sentences),
        sentences=sentences,
        width=width if video else 0,
        height=height if video else 0,
        fps=float(rate) if video else 0.0,
        has_audio=audio,
        has_video=video,
        scene_kinds=kinds,
        music=music and audio,
        seed=seed,
    )
    logger.debug("synthesised %s: %.2f s, cuts %s, %d sentences", path, sample.duration, cut_times, len(sentences))
    return sample


def parse_size(text: str) -> tuple[int, int]:
    """``"1280x720"`` -> (1280, 720)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size must look like 1280x720, got {text!r}") from None
    return w, h


def generate_corpus(
    out_dir: Path, count: int = 6, seed: int = 0, duration: float = 8.0, width: int = 320, height: int = 240
) -> list[SampleVideo]:
    """Write ``count`` varied samples ``out_dir/sample_{i:03d}.mp4`` plus manifest.jsonl and inputs.txt.

    Durations vary between 0.75x and 1.75x ``duration`` (6-14 s for 8 s), with 2-5 scenes, one
    sentence per ~3.5 s, and a melody bed on every third video; frames are ``width`` x ``height``.
    Deterministic for ``seed``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples: list[SampleVideo] = []
    for i in range(count):
        rng = random.Random(f"avforge-corpus-{seed}-{i}")
        dur = round(rng.uniform(0.75 * duration, 1.75 * duration), 2)
        max_scenes = max(1, min(5, int(dur // (_MIN_SCENE_SECONDS + 0.3))))
        n_scenes = rng.randint(min(2, max_scenes), max_scenes)
        k = max(1, round(dur / 3.5))
        speech = rng.sample(SENTENCES, k)
        sample = synth_video(
            out_dir / f"sample_{i:03d}.mp4",
            duration=dur,
            n_scenes=n_scenes,
            speech=speech,
            seed=seed * 100_003 + i,
            music=(i % 3 == 2),
            width=width,
            height=height,
        )
        samples.append(sample)
        logger.info("corpus %d/%d: %s (%.2f s, %d scenes, %d sentences)", i + 1, count, sample.path.name,
                    sample.duration, n_scenes, len(sample.sentences))
    with open(out_dir / "manifest.jsonl", "w", encoding="utf-8") as f:
        for s in samples:
            d = s.to_dict()
            d["path"] = s.path.name
            f.write(json.dumps(d) + "\n")
    with open(out_dir / "inputs.txt", "w", encoding="utf-8") as f:
        for s in samples:
            f.write(str(s.path.resolve()) + "\n")
    logger.info("corpus of %d samples written to %s", count, out_dir)
    return samples


_HTML_PAGE = """<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>403 Forbidden</title></head>
<body>
<h1>Access denied</h1>
<p>You don't have permission to access this video. Please sign in to continue.</p>
<script>window.location = "/login?next=/watch";</script>
</body>
</html>
"""


def make_bad_inputs(out_dir: Path) -> dict[str, Path]:
    """Write the broken or unusual inputs a crawl meets; return name (file stem) -> path.

    ``zero_bytes.mp4`` (empty), ``html_page.mp4`` (an HTML error page), ``random_bytes.mp4``,
    ``truncated.mp4`` (a valid mp4 cut to 40 % of its bytes), ``audio_only.m4a``,
    ``video_no_audio.mp4`` and ``tiny_0_3s.mp4`` (0.32 s at 25 fps).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    p = out_dir / "zero_bytes.mp4"
    p.write_bytes(b"")
    paths["zero_bytes"] = p

    p = out_dir / "html_page.mp4"
    p.write_text(_HTML_PAGE, encoding="utf-8")
    paths["html_page"] = p

    p = out_dir / "random_bytes.mp4"
    p.write_bytes(random.Random(1234).randbytes(64 * 1024))
    paths["random_bytes"] = p

    p = out_dir / "truncated.mp4"
    full = out_dir / ".truncated_full.mp4"
    try:
        synth_video(full, duration=6.0, n_scenes=2, seed=101)
        data = full.read_bytes()
        p.write_bytes(data[: int(len(data) * 0.4)])
    finally:
        full.unlink(missing_ok=True)
    paths["truncated"] = p

    paths["audio_only"] = synth_video(out_dir / "audio_only.m4a", duration=5.0, video=False, seed=102).path
    paths["video_no_audio"] = synth_video(out_dir / "video_no_audio.mp4", duration=5.0, n_scenes=2, audio=False,
                                          seed=103).path
    paths["tiny_0_3s"] = synth_video(out_dir / "tiny_0_3s.mp4", duration=0.3, n_scenes=1, speech=[], seed=104).path
    logger.info("bad inputs written to %s: %s", out_dir, ", ".join(sorted(paths)))
    return paths
