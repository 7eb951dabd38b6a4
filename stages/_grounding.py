"""Grounding: does a caption say only what the signals it was given support?

A caption is split into words. Function words (``STOPWORDS``) are ignored; every other word is a
*content word*. A content word is *supported* when its light stem (plural, -ing, -ed ... removed:
:func:`stem`) occurs in the text of a signal the model was shown (title, description, keywords,
other metadata, transcript, other models' captions, tag labels), or it is generic caption
vocabulary that needs no evidence (``GENERIC``: "video", "clip", "sound", "heard", "background" ...),
or it is a word a present signal implies (``CONDITIONAL``: "speaks" / "says" when there is a
transcript, "melody" when a tag names music; ``RELATED``: "tone" for a "Sine wave" tag, "barks" for
"Dog"). Tag labels below a score threshold support nothing.

*Names* (capitalised words inside a sentence, all-caps words) and *numbers* (digits and number
words from "two" up) are content words that are reported separately: an unsupported name or number
is an invention no paraphrase explains.

:func:`check` gives a :class:`Grounding` (share of supported content words, the unsupported
words, names and numbers); :func:`repair` drops the sentences and clauses that hold unsupported
words. The check runs on text only, so it works the same for every LLM backend.

Text normalisation for untrusted input lives here too (:func:`fold_text`: Unicode NFKC, zero-width,
bidi and other format/control characters removed; :func:`skeleton` also maps homoglyphs), so that
the prompt-injection check and the grounding check see the same text the model sees.

The word lists are constants of this module (documented in the README's caption section); a run
can add generic words with ``fuse.grounding.extra_allowed_words``.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field

# --------------------------------------------------------------------------- text normalisation

# Characters removed from untrusted text besides Unicode category Cc/Cf: invisible separators and
# fillers that are not "format" characters (Hangul fillers, Braille blank, combining grapheme joiner).
_INVISIBLE = frozenset("\u034f\u115f\u1160\u3164\uffa0\u2800\u17b4\u17b5\u180e")
_KEEP_CONTROL = frozenset("\n\t")


def _visible(ch: str) -> bool:
    if ch in _KEEP_CONTROL:
        return True
    if ch in _INVISIBLE:
        return False
    cat = unicodedata.category(ch)
    if cat in ("Cc", "Cf", "Co", "Cs"):  # controls, format (zero-width, bidi, tags), private use, surrogates
        return False
    if 0xFE00 <= ord(ch) <= 0xFE0F or 0xE0100 <= ord(ch) <= 0xE01EF:  # variation selectors
        return False
    return True


def fold_text(text: str) -> str:
    """Untrusted text as the model should see it: NFKC (fullwidth and compatibility forms to their
    plain letters), zero-width / bidi / control characters removed, Unicode spaces made plain."""
    text = unicodedata.normalize("NFKC", text)
    out = "".join(ch if _visible(ch) else "" for ch in text)
    return "".join(" " if ch.isspace() and ch not in "\n" else ch for ch in out)


# Latin look-alikes in other scripts (Cyrillic, Greek, Armenian, letter-like symbols) that NFKC keeps.
_HOMOGLYPHS = str.maketrans(
    {
        "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c",
        "т": "t", "у": "y", "х": "x", "ѕ": "s", "і": "i", "ї": "i", "ј": "j", "ԁ": "d", "ԛ": "q", "ԝ": "w",
        "һ": "h", "ɡ": "g", "ʏ": "y", "ɪ": "i", "ɴ": "n", "ʀ": "r", "ᴀ": "a", "ᴇ": "e", "ᴏ": "o", "ᴜ": "u",
        "α": "a", "β": "b", "ε": "e", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t", "υ": "u",
        "χ": "x", "ω": "w", "ո": "n", "օ": "o", "ս": "u", "ı": "i", "ℓ": "l", "ø": "o", "đ": "d", "ħ": "h",
    }
)  # fmt: skip
_BRACKETS = str.maketrans({"‹": "<", "›": ">", "«": "<", "»": ">", "〈": "<", "〉": ">", "⟨": "<", "⟩": ">"})
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "!": "i", "|": "l"})
# runs of single letters split by one separator each: "i g n o r e", "i.g.n.o.r.e", "i-g-n-o-r-e"
_SPACED = re.compile(r"(?<![^\W\d_])(?:[^\W\d_][ .\-_*·•/]){3,}[^\W\d_](?![^\W\d_])")


def skeleton(text: str) -> str:
    """A lower-case Latin skeleton of ``text`` for pattern checks: :func:`fold_text`, accents and
    other combining marks dropped, homoglyphs mapped to the Latin letters they imitate."""
    text = fold_text(text).translate(_BRACKETS)
    text = unicodedata.normalize("NFKD", text.casefold())
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    return text.translate(_HOMOGLYPHS)


def check_variants(text: str) -> list[str]:
    """The skeleton of ``text`` plus the variants an obfuscated instruction hides behind: letters
    joined where they were spaced out one by one, and digits/symbols read as the letters they imitate."""
    base = skeleton(text)
    variants = [base]
    joined = _SPACED.sub(lambda m: re.sub(r"[ .\-_*·•/]", "", m.group(0)), base)
    if joined != base:
        variants.append(joined)
    leet = re.sub(r"[a-z0-9@$!|]+", lambda m: m.group(0).translate(_LEET) if re.search(r"[a-z]", m.group(0)) else m.group(0), joined)
    if leet != joined:
        variants.append(leet)
    return variants


# --------------------------------------------------------------------------- word lists

# Function words: never counted as content (English; captions are written in English).
STOPWORDS: frozenset[str] = frozenset(
    """
    a an the this that these those there here it its it's itself they them their theirs themselves he him his
    himself she her hers herself we us our ours you your yours i me my mine one ones someone's
    and or but nor so yet as if than then while when whenever where wherever whereas because since though
    although until unless whether also too very quite rather just only even still again already almost
    of in on at to from by with without within into onto upon over under above below about around through
    throughout across along among between behind beside besides beyond near off out up down after before during
    against toward towards via per like unlike
    be is are was were been being am do does did doing done have has had having will would shall should can
    could may might must not no nor n't don't doesn't isn't aren't wasn't weren't can't cannot won't
    what which who whom whose why how all any both each every few more most other some such own same
    another much many lot lots several various certain first next last
    s t d ll m o re ve y ok yes
    """.split()
)

# Generic caption vocabulary: words any caption of any clip may use without evidence.
GENERIC: frozenset[str] = frozenset(
    """
    video clip scene footage shot frame image picture view recording record content segment moment part
    show display present depict feature appear seem visible see seen watch look
    sound audio hear heard listen audible noise background foreground ambient
    caption title titled called named describe description detail available visual information
    begin beginning start end ending continue throughout time short brief long
    thing something object item
    """.split()
)

# Words a present signal implies (signal condition -> words).
CONDITIONAL: dict[str, frozenset[str]] = {
    "speech": frozenset(
        """
        speak speaks speaking spoke spoken speech speaker voice voices say says said saying talk talks talking
        narrate narrates narration narrator explain explains explaining explanation describe describes
        discuss discusses mention mentions tell tells telling word words sentence phrase statement
        someone somebody person people individual announce announces ask asks question answer state states
        """.split()
    ),
    "music": frozenset(
        """music musical melody melodic tune tuneful song instrumental rhythm rhythmic beat tempo play plays
        playing played soundtrack accompaniment accompanied harmony chord note notes""".split()
    ),
    "singing": frozenset("sing sings singing sang sung singer vocal vocals voice song lyric lyrics".split()),
    "visual": frozenset("color colour colorful colourful bright dark light shape pattern motion move moving".split()),
}

# A few tag words that imply others (label stem -> words); kept small on purpose.
RELATED: dict[str, tuple[str, ...]] = {
    "sine": ("tone", "hum", "beep", "pitch", "whine", "electronic", "steady"),
    "tone": ("sine", "hum", "beep", "pitch"),
    "hum": ("tone", "drone", "buzz"),
    "beep": ("tone", "bleep"),
    "silence": ("quiet", "silent"),
    "dog": ("bark", "puppy"),
    "bark": ("dog",),
    "cat": ("meow", "kitten"),
    "meow": ("cat",),
    "bird": ("chirp", "tweet", "birdsong"),
    "vehicle": ("car", "engine", "traffic"),
    "car": ("vehicle", "engine", "traffic"),
    "engine": ("motor", "vehicle"),
    "traffic": ("car", "vehicle", "street", "road"),
    "rain": ("water", "drop", "raindrop", "wet"),
    "water": ("liquid", "splash", "flow"),
    "wind": ("blow", "breeze", "gust"),
    "applause": ("clap", "clapping", "audience"),
    "laughter": ("laugh", "laughing"),
    "crowd": ("people", "audience"),
    "guitar": ("string", "strum", "instrument"),
    "piano": ("key", "keyboard", "instrument"),
    "violin": ("string", "bow", "instrument"),
    "drum": ("beat", "percussion", "rhythm", "instrument"),
    "kitchen": ("cook", "cooking", "food"),
    "cook": ("kitchen", "food", "dish"),
    "man": ("male", "person"),
    "woman": ("female", "person"),
    "child": ("kid", "person"),
    "person": ("someone", "people", "individual"),
    "male": ("man",),
    "female": ("woman",),
    "narration": ("narrator", "narrate"),
    "speech": ("speak", "talk", "voice"),
    "synthesizer": ("synthetic", "electronic", "computer"),
    "gradient": ("color", "colour", "blend"),
    "pattern": ("shape", "design"),
    "text": ("word", "letter", "writing"),
}

# Tag labels that mean music or singing is heard (lower-case substrings of the label).
MUSIC_LABEL_WORDS = (
    "music", "song", "instrument", "guitar", "piano", "violin", "drum", "orchestra", "band", "choir", "melody",
    "synthesizer", "keyboard", "organ", "bass", "trumpet", "flute", "saxophone", "cello", "harp", "banjo",
    "ukulele", "accordion", "percussion", "jingle", "lullaby", "hip hop", "rock", "pop", "jazz", "techno",
)  # fmt: skip
SINGING_LABEL_WORDS = ("singing", "sing", "choir", "song", "vocal", "chant", "yodel", "rapping", "humming")
SPEECH_LABEL_WORDS = ("speech", "speaking", "conversation", "narration", "monologue", "talk")

NUMBER_WORDS: dict[str, str] = {
    "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9",
    "ten": "10", "eleven": "11", "twelve": "12", "thirteen": "13", "fourteen": "14", "fifteen": "15",
    "sixteen": "16", "seventeen": "17", "eighteen": "18", "nineteen": "19", "twenty": "20", "thirty": "30",
    "forty": "40", "fifty": "50", "hundred": "100", "thousand": "1000", "million": "1000000",
    "second": "2", "third": "3", "fourth": "4", "fifth": "5", "dozen": "12", "pair": "2", "couple": "2",
    "twice": "2", "double": "2", "triple": "3",
}  # fmt: skip
# "second" is also a unit of time; "first" and "one" are counted as function words.
_AMBIGUOUS_NUMBERS = frozenset({"second", "couple", "double", "pair"})

_IRREGULAR: dict[str, str] = {
    "men": "man", "women": "woman", "children": "child", "people": "person", "feet": "foot", "teeth": "tooth",
    "mice": "mouse", "geese": "goose", "leaves": "leaf", "knives": "knife", "wives": "wife", "lives": "life",
    "said": "say", "says": "say", "spoke": "speak", "spoken": "speak", "sang": "sing", "sung": "sing",
    "ran": "run", "saw": "see", "seen": "see", "heard": "hear", "made": "make", "took": "take", "taken": "take",
    "gave": "give", "given": "give", "went": "go", "gone": "go", "came": "come", "held": "hold", "sat": "sit",
    "stood": "stand", "told": "tell", "wrote": "write", "written": "write", "drove": "drive", "driven": "drive",
    "ate": "eat", "eaten": "eat", "flew": "fly", "flown": "fly", "threw": "throw", "thrown": "throw",
    "built": "build", "bought": "buy", "brought": "bring", "caught": "catch", "taught": "teach",
    "thought": "think", "found": "find", "left": "leave", "lit": "light", "shown": "show", "grew": "grow",
    "children's": "child", "colour": "color", "colours": "color", "coloured": "color", "colourful": "colorful",
    "grey": "gray", "cooking": "cook", "boiling": "boil", "singer": "sing", "dancer": "dance",
    "speaker": "speak", "player": "play", "drummer": "drum", "talker": "talk",
}  # fmt: skip

_VOWELS = set("aeiouy")


def stem(word: str) -> str:
    """A light stem: lower case, possessive, plural and -ing/-ed/-ly endings removed, a doubled final
    consonant and a final silent e dropped. Applied to caption and signal words alike, so
    "dancing", "dances" and "danced" meet "dance"."""
    w = word.casefold().replace("’", "'")
    if w.endswith("'s"):
        w = w[:-2]
    w = w.replace("'", "")
    if w in _IRREGULAR:
        w = _IRREGULAR[w]
    if len(w) <= 3 or not w.isalpha():
        return w
    if w.endswith("ies") and len(w) > 4:
        w = w[:-3] + "y"
    elif w.endswith("ied") and len(w) > 4:
        w = w[:-3] + "y"
    elif w.endswith("sses"):
        w = w[:-2]
    elif w.endswith("ing") and len(w) > 5 and _VOWELS & set(w[:-3]):
        w = w[:-3]
    elif w.endswith("ed") and len(w) > 4 and _VOWELS & set(w[:-2]):
        w = w[:-2]
    elif w.endswith("es") and len(w) > 4 and (w[-3] in "sxz" or w[-4:-2] in ("ch", "sh")):
        w = w[:-2]
    elif w.endswith("s") and not w.endswith(("ss", "us", "is")) and len(w) > 3:
        w = w[:-1]
    elif w.endswith("ly") and len(w) > 5:
        w = w[:-2]
    if len(w) > 3 and w[-1] == w[-2] and w[-1] not in "lsz" and w[-1] not in _VOWELS:
        w = w[:-1]
    if len(w) > 3 and w.endswith("e") and w[-2] != "e":
        w = w[:-1]
    return w


_TOKEN = re.compile(r"\d+(?:[.,:]\d+)*|[^\W\d_]+(?:['’][^\W\d_]+)*")
_SENTENCE_END = re.compile(r"[.!?…:;\n\"“”]")


def _number(token: str) -> str:
    """A canonical number: "10.0" -> "10", "1,000" -> "1000"."""
    plain = token.replace(",", "")
    try:
        value = float(plain) if ":" not in plain else None
    except ValueError:
        value = None
    if value is None:
        return plain
    return str(int(value)) if value.is_integer() else f"{value:g}"


@dataclass(frozen=True)
class Token:
    text: str  # as written
    start: int  # offset in the text
    kind: str  # "word" | "number" | "name"
    key: str  # the stem (words, names) or canonical number


def tokens(text: str) -> list[Token]:
    """The content tokens of ``text`` (function words left out), with their kind."""
    text = fold_text(text)
    out: list[Token] = []
    sentence_start = True
    last_end = 0
    for match in _TOKEN.finditer(text):
        raw = match.group(0)
        if _SENTENCE_END.search(text[last_end : match.start()]) or last_end == 0:
            sentence_start = True
        last_end = match.end()
        first, sentence_start = sentence_start, False
        if raw[0].isdigit():
            out.append(Token(raw, match.start(), "number", _number(raw)))
            continue
        low = raw.casefold().replace("’", "'")
        if low in STOPWORDS or stem(low) in STOPWORDS:
            continue
        if low in NUMBER_WORDS and low not in _AMBIGUOUS_NUMBERS:
            out.append(Token(raw, match.start(), "number", NUMBER_WORDS[low]))
            continue
        is_name = (raw[0].isupper() and not first) or (len(raw) > 1 and raw.isupper())
        out.append(Token(raw, match.start(), "name" if is_name else "word", stem(low)))
    return out


# --------------------------------------------------------------------------- support and check


@dataclass
class Support:
    """What a clip's signals support: word stems, numbers, and the conditions that imply vocabulary."""

    stems: set[str] = field(default_factory=set)
    numbers: set[str] = field(default_factory=set)
    conditions: set[str] = field(default_factory=set)  # speech, music, singing, visual, audio
    allowed: set[str] = field(default_factory=set)  # extra generic word stems (config)

    def add_text(self, text: str | None) -> None:
        if not text:
            return
        for tok in tokens(text):
            if tok.kind == "number":
                self.numbers.add(tok.key)
            else:
                self.stems.add(tok.key)
                self.stems.update(_RELATED_STEMS.get(tok.key, ()))
        # number words in the signal support their digits and vice versa
        for word in re.findall(r"[^\W\d_]+", fold_text(text).casefold()):
            if word in NUMBER_WORDS:
                self.numbers.add(NUMBER_WORDS[word])

    def add_label(self, label: str) -> None:
        """A tag label (already above the score threshold): its words, related words and conditions."""
        self.add_text(label)
        low = label.casefold()
        if any(w in low for w in MUSIC_LABEL_WORDS):
            self.conditions.add("music")
        if any(w in low for w in SINGING_LABEL_WORDS):
            self.conditions.update(("singing", "music"))
        if any(w in low for w in SPEECH_LABEL_WORDS):
            self.conditions.add("speech")

    def supports(self, tok: Token) -> bool:
        if tok.kind == "number":
            return tok.key in self.numbers
        if tok.key in self.stems or tok.key in self.allowed or tok.key in _GENERIC_STEMS:
            return True
        return any(tok.key in _CONDITIONAL_STEMS[c] for c in self.conditions if c in _CONDITIONAL_STEMS)


_GENERIC_STEMS = frozenset(stem(w) for w in GENERIC)
_RELATED_STEMS = {stem(k): frozenset(stem(w) for w in words) for k, words in RELATED.items()}
_CONDITIONAL_STEMS = {name: frozenset(stem(w) for w in words) for name, words in CONDITIONAL.items()}


@dataclass
class Grounding:
    """The grounding of one text against a :class:`Support`."""

    content: int  # content words (names and numbers included)
    supported: int
    unsupported: list[str]  # unsupported content words as written (names and numbers included)
    names: list[str]  # unsupported names
    numbers: list[str]  # unsupported numbers

    @property
    def score(self) -> float:
        """Share of supported content words (1.0 for a text without content words)."""
        return self.supported / self.content if self.content else 1.0

    def grounded(self, min_share: float, max_names: int = 0) -> bool:
        return self.score >= min_share and len(self.names) + len(self.numbers) <= max_names

    def __add__(self, other: Grounding) -> Grounding:
        return Grounding(
            self.content + other.content,
            self.supported + other.supported,
            self.unsupported + other.unsupported,
            self.names + other.names,
            self.numbers + other.numbers,
        )


EMPTY = Grounding(0, 0, [], [], [])


def check(text: str | None, support: Support) -> Grounding:
    """Count the content words, names and numbers of ``text`` that ``support`` does not support."""
    if not text:
        return Grounding(0, 0, [], [], [])
    toks = tokens(text)
    unsupported = [t for t in toks if not support.supports(t)]
    return Grounding(
        content=len(toks),
        supported=len(toks) - len(unsupported),
        unsupported=[t.text for t in unsupported],
        names=[t.text for t in unsupported if t.kind == "name"],
        numbers=[t.text for t in unsupported if t.kind == "number"],
    )


# --------------------------------------------------------------------------- repair

_SENTENCES = re.compile(r"[^.!?…]+(?:[.!?…]+[\"”’)]*|$)")
_CLAUSE_SPLIT = re.compile(
    r"\s*(?:[,;:]|\s[-–—]\s|\((?=[^)]*\)))\s*|\s+(?=(?:and|while|but|with|as|where|which|who|whereas|then)\s)",
    re.IGNORECASE,
)


def _clean_join(parts: list[str]) -> str:
    text = " ".join(p.strip() for p in parts if p.strip())
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    text = re.sub(r"[,;:]\s*([.!?]|$)", r"\1", text)
    text = re.sub(r"\s{2,}", " ", text).strip(" ,;:-–—")
    return text


def _keeps(part: str, support: Support, min_share: float) -> bool:
    g = check(part, support)
    return not g.unsupported or (g.grounded(min_share) and g.content >= 4)


def repair(text: str, support: Support, min_share: float) -> str:
    """``text`` without its unsupported sentences and clauses ("" when nothing supported is left).

    A sentence is kept whole when it is grounded; otherwise it is cut into clauses (at commas,
    semicolons, dashes and before "and", "while", "with", "which" ...) and only its leading clauses
    without unsupported content words are kept, up to the first clause with one: a later clause
    may lean on a dropped one ("... of the audio, which holds music and speech" must not become
    "of the audio and speech"). A sentence left with no content word is dropped.
    """
    kept_sentences: list[str] = []
    for match in _SENTENCES.finditer(text.strip()):
        sentence = match.group(0).strip()
        if not sentence:
            continue
        if _keeps(sentence, support, min_share):
            kept_sentences.append(sentence)
            continue
        end = re.search(r"[.!?…]+[\"”’)]*$", sentence)
        tail = end.group(0) if end else ""
        body = sentence[: len(sentence) - len(tail)] if tail else sentence
        pieces = [p for p in _CLAUSE_SPLIT.split(body) if p and p.strip()]
        kept = []
        for piece in pieces:
            if check(piece, support).unsupported:
                break
            kept.append(piece)
        if not kept or not any(check(p, support).content for p in kept):
            continue
        first = re.sub(r"^(?:and|while|but|with|as|where|which|who|whereas|then)\s+", "", kept[0].strip(), flags=re.IGNORECASE)
        kept[0] = first[:1].upper() + first[1:]
        joined = _clean_join(kept)
        if joined:
            kept_sentences.append(joined + (tail.strip() or "."))
    return " ".join(kept_sentences)


def content_words(text: str | None) -> list[str]:
    """Content word stems of ``text`` (names included, numbers as canonical digits)."""
    return [t.key for t in tokens(text)] if text else []


def carried_share(source: str | None, text: str | None) -> float | None:
    """Share of the distinct content words of ``source`` (e.g. a transcript) that ``text`` carries."""
    words = set(content_words(source))
    if not words:
        return None
    return len(words & set(content_words(text))) / len(words)


def normalise_words(words: Iterable[str]) -> set[str]:
    """Stems of configured words (``extra_allowed_words``)."""
    return {stem(w) for w in words if w.strip()}
