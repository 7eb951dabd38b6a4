"""Metric functions of the quality benchmark (plain Python, no pipeline imports).

* :func:`true_duplicate_pairs` / :func:`pairs_from_groups` / :func:`precision_recall`: pairwise dedup
  precision and recall. Two clips are true duplicates when they show the same original content
  over the same time span of that original (after mapping each clip onto its original's timeline,
  the shared span covers at least half of the shorter clip); clips of one video at different
  times are *not* duplicates.
* :func:`auc`: rank-based ROC AUC (Mann-Whitney U; ties count one half).
* :func:`content_words` / :func:`supported`: the content words of a caption and which of them a
  clip's signals support (the benchmark's own grounding measure, independent of the pipeline's).
* WER: ``tests.bench.asr_bench.wer`` (one WER function for every bench).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

Pair = frozenset[str]


@dataclass(frozen=True)
class ClipSpan:
    """Where a clip's content comes from: an original and a time span on its timeline."""

    key: str
    content_id: str
    start: float
    end: float


def time_iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Intersection over union of two time intervals (0 when either is empty)."""
    inter = min(a[1], b[1]) - max(a[0], b[0])
    union = max(a[1], b[1]) - min(a[0], b[0])
    if inter <= 0 or union <= 0:
        return 0.0
    return inter / union


def time_cover(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Share of the shorter interval that the other one covers (1.0 when one holds the other)."""
    inter = min(a[1], b[1]) - max(a[0], b[0])
    shorter = min(a[1] - a[0], b[1] - b[0])
    if inter <= 0 or shorter <= 0:
        return 0.0
    return inter / shorter


def true_duplicate_pairs(clips: Sequence[ClipSpan], min_cover: float = 0.5) -> set[Pair]:
    """Pairs of clips with the same content over (mostly) the same span of the original: the span
    they share covers at least ``min_cover`` of the shorter clip (a head-trimmed copy's clip shifted
    by 1.6 s is a duplicate; so is a 10 s clip inside a 20 s clip of the same content; neighbouring
    clips of one video are not)."""
    by_content: dict[str, list[ClipSpan]] = {}
    for c in clips:
        by_content.setdefault(c.content_id, []).append(c)
    pairs: set[Pair] = set()
    for group in by_content.values():
        for a, b in itertools.combinations(group, 2):
            if time_cover((a.start, a.end), (b.start, b.end)) >= min_cover:
                pairs.add(frozenset((a.key, b.key)))
    return pairs


def pairs_from_groups(group_of: Mapping[str, str]) -> set[Pair]:
    """Every pair of keys that share a group label (a group of n gives n(n-1)/2 pairs)."""
    members: dict[str, list[str]] = {}
    for key, group in group_of.items():
        members.setdefault(group, []).append(key)
    return {frozenset(p) for keys in members.values() for p in itertools.combinations(sorted(keys), 2)}


def groups_from_links(keys: Iterable[str], links: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Connected components (union-find) of ``keys`` linked by ``links``: key -> group label."""
    parent = {k: k for k in keys}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in links:
        if a in parent and b in parent:
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    return {k: find(k) for k in parent}


def precision_recall(predicted: set[Pair], truth: set[Pair]) -> tuple[float | None, float | None]:
    """Pairwise precision and recall; None where undefined (no predicted / no true pairs)."""
    hit = len(predicted & truth)
    precision = hit / len(predicted) if predicted else None
    recall = hit / len(truth) if truth else None
    return precision, recall


def auc(positive: Sequence[float], negative: Sequence[float]) -> float | None:
    """P(score of a random positive > score of a random negative), ties counted 1/2 (None if a side is empty)."""
    if not positive or not negative:
        return None
    wins = 0.0
    for p in positive:
        for n in negative:
            wins += 1.0 if p > n else 0.5 if p == n else 0.0
    return wins / (len(positive) * len(negative))


def rate(n: int, d: int) -> float | None:
    return n / d if d else None


# --------------------------------------------------------------------------- grounding

#: function words and the vocabulary every caption uses to talk about the medium itself
#: ("a video shows a person speaking"); these are never counted as claims about the content
STOPWORDS = frozenset(
    """
    a an the and or but if then than so as of at by for from in into on onto to with without within over under
    about above below across after before during while when where which who whom whose what that this these those
    how why now titled title called named entitled
    there here it its it's itself they them their he him his she her hers we our us you your i me my mine
    is are was were be been being am do does did doing done has have had having will would can could should
    may might must shall not no nor only also just very too more most less some any each every all both few many
    much such same other another own one ones up down out off again further once s t don't isn't
    video videos clip clips footage scene scenes frame frames shot shots image images picture pictures screen
    show shows showing shown shown features featuring feature appear appears appearing visible seen see sees
    person people someone somebody speaker speakers narrator narrators voice voices voiceover voice-over
    speak speaks speaking spoke spoken say says saying said talk talks talking explain explains explaining
    describe describes describing mention mentions mentioning discuss discusses discussing tell tells telling
    hear heard hears audio sound sounds sounding speech spoken words word sentence sentences statement
    background foreground while throughout begins starts continues ends short brief long
    caption captions content contents moment moments time times second seconds part parts
    """.split()
)

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def _stem(word: str) -> str:
    for suffix in ("ing", "ies", "ed", "es", "s", "ly"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)] + ("y" if suffix == "ies" else "")
    return word


def content_words(text: str | None) -> list[str]:
    """Lower-cased content words and numbers of ``text`` (stopwords and 1-2 letter words left out)."""
    out = []
    for w in _WORD.findall((text or "").lower()):
        if w in STOPWORDS or (len(w) < 3 and not w.isdigit()):
            continue
        out.append(w)
    return out


def supported(caption: str | None, signals: Iterable[str | None]) -> tuple[list[str], list[str]]:
    """(content words of ``caption``, those no signal text mentions), compared by crude stems."""
    words = content_words(caption)
    vocab = {_stem(w) for text in signals for w in _WORD.findall((text or "").lower())}
    unsupported = [w for w in words if _stem(w) not in vocab]
    return words, unsupported


def carried(transcript: str | None, caption: str | None) -> tuple[int, int]:
    """(transcript content words that also appear in the caption, transcript content words), by stems."""
    words = set(_stem(w) for w in content_words(transcript))
    in_caption = {_stem(w) for w in content_words(caption)}
    return len(words & in_caption), len(words)
