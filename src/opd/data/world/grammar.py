"""Prompt grammar of the mini world: three task prompt sets and their splits.

Tasks and their metadata (one JSON object per line in ``data/mini/<task>_<split>.jsonl``):

- ``geneval``: GenEval's ``*_metadata.jsonl`` schema, shape kinds as classes::

      {"tag": "position", "include": [{"class": "circle", "count": 1},
       {"class": "square", "count": 1, "position": ["left of", 0]}], "exclude": [],
       "prompt": "a photo of a square left of a circle"}

  Tags ``single_object``, ``two_object``, ``counting`` (1-4; ``exclude`` holds ``count + 1`` so the
  count is exact, as in GenEval), ``colors``, ``position`` (clause 1 lies ``rel`` of clause 0) and
  ``color_attr``. Split: the ``GENEVAL_TEST_FRACTION`` of the ``colors``, ``position`` and
  ``color_attr`` prompts with the lowest salted hash are held out for test; ``single_object``,
  ``two_object`` and ``counting`` have only 3-12 possible prompts in this world, so both splits
  share them (as GenEval's test set shares templates with Flow-GRPO's training prompts). Each
  split file lists every tag equally often (rows cycle through the tag's prompts), so per-tag
  accuracies have similar variance.
- ``ocr``: ``{"tag": "ocr", "prompt": 'a sign that says "CAT"', "text": "CAT"}``; 3-character
  upper-case strings (English words, numbers, mixed). A salted hash of the string sends
  ``OCR_TEST_FRACTION`` of the vocabulary to test; pre-training never draws a test string either.
- ``aesthetic``: captions of whole scenes (``"a red circle and a blue square on a navy
  background"``) with ``{"tag": "aesthetic", "prompt": ..., "background": ..., "objects": [...]}``;
  ``objects`` lists what the caption states (``class``/``color`` where named, ``count``) so that
  :func:`opd.data.world.layout.scene_for` can draw it; ``distinct_colors``/``layout``/``scale`` are optional. Split by a
  salted hash of the prompt, so no caption is in both.

``opd.data.world.layout`` draws scenes satisfying any entry (``scene_for``) and the pre-training
pairs with truthful captions (``random_scene``). All randomness flows from the ``random.Random``
passed in.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from functools import lru_cache
from pathlib import Path
from typing import Any

from opd.data.world.scene import (
    BACKGROUNDS,
    OBJECT_COLORS,
    PLURALS,
    RELATIONS,
    SHAPE_KINDS,
)

TASKS: tuple[str, ...] = ("geneval", "ocr", "aesthetic")
SPLITS: tuple[str, ...] = ("train", "test")
GENEVAL_TAGS: tuple[str, ...] = (
    "single_object",
    "two_object",
    "counting",
    "colors",
    "position",
    "color_attr",
)
SHARED_TAGS: frozenset[str] = frozenset({"single_object", "two_object", "counting"})
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}

GENEVAL_TEST_FRACTION = 0.25
OCR_TEST_FRACTION = 0.1
AESTHETIC_TEST_FRACTION = 0.2
#: rows per file: (train, test). GenEval rows are per tag.
GENEVAL_ROWS_PER_TAG = (334, 50)
AESTHETIC_ROWS = (1000, 200)

#: where write_prompt_files puts the committed prompt sets: <repo>/data/mini
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[4] / "data" / "mini"

OCR_TEMPLATE = 'a sign that says "{}"'
#: characters of mixed/random strings: no I or O, which this font draws like 1 and 0 (RapidOCR
#: confused exactly those in mixed strings; words and numbers give context and keep them)
_ALNUM = "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"
# fmt: off
_WORDS = (
    "ACE", "ACT", "ADD", "AGE", "AID", "AIM", "AIR", "ALL", "ANT", "APE", "ARC", "ARM", "ART", "ASH", "ASK",
    "AXE", "BAD", "BAG", "BAT", "BED", "BEE", "BIG", "BIN", "BOW", "BOX", "BOY", "BUD", "BUG", "BUS", "BUY",
    "CAB", "CAN", "CAP", "CAR", "CAT", "COW", "CRY", "CUB", "CUP", "CUT", "DAY", "DEN", "DEW", "DIG", "DOG",
    "DOT", "DRY", "DUO", "EAR", "EAT", "EGG", "ELF", "ELK", "ELM", "END", "EYE", "FAN", "FAR", "FAT", "FEW",
    "FIG", "FIN", "FIR", "FIT", "FIX", "FLY", "FOG", "FOX", "FUN", "FUR", "GAP", "GAS", "GEM", "GYM", "HAM",
    "HAT", "HAY", "HEN", "HIP", "HIT", "HOP", "HOT", "HUB", "HUG", "HUT", "ICE", "ICY", "INK", "INN", "JAM",
    "JAR", "JAW", "JET", "JOB", "JOG", "JOY", "KEY", "KID", "KIT", "LAB", "LAP", "LAW", "LEG", "LID", "LIP",
    "LOG", "LOW", "MAP", "MAT", "MIX", "MOB", "MOP", "MUD", "MUG", "NAP", "NET", "NEW", "NOD", "NUT", "OAK",
    "OAR", "OAT", "ODD", "OIL", "OLD", "OWL", "OWN", "PAD", "PAN", "PAW", "PEA", "PEN", "PET", "PIE", "PIG",
    "PIN", "POD", "POT", "RAG", "RAM", "RAT", "RAY", "RED", "RIB", "RIM", "ROW", "RUG", "RUN", "SAD", "SAW",
    "SEA", "SET", "SKY", "SUN", "TAB", "TAN", "TAP", "TEA", "TEN", "TIP", "TOE", "TOP", "TOY", "TUB", "VAN",
    "WAX", "WEB", "WET", "WIG", "WIN", "YAK", "YAM", "ZIP", "ZOO",
)
# fmt: on
_NUM_MIXED = 300


# --------------------------------------------------------------------------- splits


def _hash_unit(key: str, seed: int) -> float:
    """A salted hash of ``key`` in [0, 1) (independent of PYTHONHASHSEED and of pool order)."""
    digest = hashlib.sha1(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _in_test(key: str, fraction: float, seed: int) -> bool:
    return _hash_unit(key, seed) < fraction


# --------------------------------------------------------------------------- geneval


def _clause(
    kind: str, count: int = 1, color: str | None = None, position: list | None = None
) -> dict[str, Any]:
    clause: dict[str, Any] = {"class": kind, "count": count}
    if color is not None:
        clause["color"] = color
    if position is not None:
        clause["position"] = position
    return clause


def _geneval(tag: str, include: list[dict], prompt: str, exclude: list[dict] | None = None) -> dict[str, Any]:
    return {"tag": tag, "include": include, "exclude": exclude or [], "prompt": prompt}


def geneval_pool(tag: str) -> list[dict[str, Any]]:
    """Every distinct GenEval entry of ``tag`` in this world, in a fixed order."""
    pairs = list(itertools.permutations(SHAPE_KINDS, 2))
    if tag == "single_object":
        return [_geneval(tag, [_clause(k)], f"a photo of a {k}") for k in SHAPE_KINDS]
    if tag == "two_object":
        return [_geneval(tag, [_clause(a), _clause(b)], f"a photo of a {a} and a {b}") for a, b in pairs]
    if tag == "counting":
        return [
            _geneval(
                tag,
                [_clause(k, n)],
                f"a photo of {NUMBER_WORDS[n]} {k if n == 1 else PLURALS[k]}",
                [_clause(k, n + 1)],
            )
            for k in SHAPE_KINDS
            for n in NUMBER_WORDS
        ]
    if tag == "colors":
        return [
            _geneval(tag, [_clause(k, color=c)], f"a photo of a {c} {k}")
            for k in SHAPE_KINDS
            for c in OBJECT_COLORS
        ]
    if tag == "position":
        # GenEval's encoding: clause 1 is `rel` of clause 0, and the prompt names clause 1 first
        return [
            _geneval(tag, [_clause(a), _clause(b, position=[rel, 0])], f"a photo of a {b} {rel} a {a}")
            for a, b in pairs
            for rel in RELATIONS
        ]
    if tag == "color_attr":
        return [
            _geneval(
                tag, [_clause(a, color=ca), _clause(b, color=cb)], f"a photo of a {ca} {a} and a {cb} {b}"
            )
            for a, b in pairs
            for ca, cb in itertools.permutations(OBJECT_COLORS, 2)
        ]
    raise ValueError(f"unknown GenEval tag {tag!r}; expected one of {GENEVAL_TAGS}")


def geneval_split(tag: str, split: str, seed: int = 0) -> list[dict[str, Any]]:
    """The distinct entries of ``tag`` that belong to ``split`` (shared tags: all of them)."""
    pool = geneval_pool(tag)
    if tag in SHARED_TAGS:
        return pool
    # the pools are small (18-180), so hold out an exact fraction: the entries of lowest hash
    ranked = sorted(pool, key=lambda m: _hash_unit(m["prompt"], seed))
    held_out = {m["prompt"] for m in ranked[: math.ceil(GENEVAL_TEST_FRACTION * len(pool))]}
    return [m for m in pool if (m["prompt"] in held_out) == (split == "test")]


def _cycle_rows(pool: list[dict], num_rows: int, rng: random.Random) -> list[dict]:
    """``num_rows`` entries cycling through shuffled passes over ``pool`` (balanced coverage)."""
    rows: list[dict] = []
    while len(rows) < num_rows:
        order = list(pool)
        rng.shuffle(order)
        rows.extend(order)
    return rows[:num_rows]


def geneval_rows(split: str, seed: int = 0) -> list[dict[str, Any]]:
    """The rows of ``geneval_<split>.jsonl``: every tag equally often, shuffled."""
    rng = random.Random(f"geneval-{split}-{seed}")
    per_tag = GENEVAL_ROWS_PER_TAG[SPLITS.index(split)]
    rows = [row for tag in GENEVAL_TAGS for row in _cycle_rows(geneval_split(tag, split, seed), per_tag, rng)]
    rng.shuffle(rows)
    return rows


# --------------------------------------------------------------------------- ocr


@lru_cache(maxsize=4)
def ocr_vocabulary(seed: int = 0) -> tuple[str, ...]:
    """The OCR strings: 3-letter words, 3-digit numbers and mixed letter/digit strings (sorted)."""
    rng = random.Random(f"ocr-mixed-{seed}")
    mixed: set[str] = set()
    while len(mixed) < _NUM_MIXED:
        text = "".join(rng.choice(_ALNUM) for _ in range(3))
        if any(c.isdigit() for c in text) and any(c.isalpha() for c in text):
            mixed.add(text)
    numbers = {str(n) for n in range(100, 1000)}
    return tuple(sorted(set(_WORDS) | numbers | mixed))


@lru_cache(maxsize=4)
def ocr_test_strings(seed: int = 0) -> frozenset[str]:
    """Strings held out for testing; never used for training or pre-training."""
    return frozenset(t for t in ocr_vocabulary(seed) if _in_test(t, OCR_TEST_FRACTION, seed))


def ocr_meta(text: str) -> dict[str, Any]:
    return {"tag": "ocr", "prompt": OCR_TEMPLATE.format(text), "text": text}


def ocr_rows(split: str, seed: int = 0) -> list[dict[str, Any]]:
    """The rows of ``ocr_<split>.jsonl``: every string of the split once, shuffled."""
    held_out = ocr_test_strings(seed)
    texts = [t for t in ocr_vocabulary(seed) if (t in held_out) == (split == "test")]
    random.Random(f"ocr-{split}-{seed}").shuffle(texts)
    return [ocr_meta(t) for t in texts]


@lru_cache(maxsize=4)
def _ocr_train_strings(seed: int) -> tuple[str, ...]:
    held_out = ocr_test_strings(seed)
    return tuple(t for t in ocr_vocabulary(seed) if t not in held_out)


def random_text(rng: random.Random, seed: int = 0) -> str:
    """A training string: half from the training vocabulary, half uniformly random (never test)."""
    held_out = ocr_test_strings(seed)
    if rng.random() < 0.5:
        return rng.choice(_ocr_train_strings(seed))
    while True:
        text = "".join(rng.choice(_ALNUM) for _ in range(3))
        if text not in held_out:
            return text


# --------------------------------------------------------------------------- aesthetic


def distinct_colors(rng: random.Random, n: int) -> list[str]:
    return rng.sample(list(OBJECT_COLORS), n)


def random_aesthetic_meta(rng: random.Random) -> dict[str, Any]:
    """A random scene caption with the structure :func:`scene_for` needs to draw it."""
    bg = rng.choice(list(BACKGROUNDS))
    kinds, colors = list(SHAPE_KINDS), list(OBJECT_COLORS)
    style = rng.choice(["single", "pair", "trio", "group", "colourful", "row"])
    meta: dict[str, Any] = {"tag": "aesthetic", "background": bg}
    if style == "single":
        scale, kind, color = rng.choice(["small", "large"]), rng.choice(kinds), rng.choice(colors)
        meta.update(
            prompt=f"a {scale} {color} {kind} on a {bg} background",
            objects=[_clause(kind, color=color)],
            scale=scale,
        )
    elif style == "pair":
        (ka, kb), (ca, cb) = (rng.choice(kinds), rng.choice(kinds)), distinct_colors(rng, 2)
        meta.update(
            prompt=f"a {ca} {ka} and a {cb} {kb} on a {bg} background",
            objects=[_clause(ka, color=ca), _clause(kb, color=cb)],
        )
    elif style == "trio":
        (ka, kb, kc), (ca, cb, cc) = rng.sample(kinds, 3), distinct_colors(rng, 3)
        meta.update(
            prompt=f"a {ca} {ka}, a {cb} {kb} and a {cc} {kc} on a {bg} background",
            objects=[_clause(ka, color=ca), _clause(kb, color=cb), _clause(kc, color=cc)],
        )
    elif style == "group":
        n, kind, color = rng.randint(2, 4), rng.choice(kinds), rng.choice(colors)
        meta.update(
            prompt=f"{NUMBER_WORDS[n]} {color} {PLURALS[kind]} on a {bg} background",
            objects=[_clause(kind, n, color)],
        )
    elif style == "colourful":
        n = rng.randint(3, 4)
        meta.update(
            prompt=f"a colourful scene with {NUMBER_WORDS[n]} shapes on a {bg} background",
            objects=[{"count": n}],
            distinct_colors=True,
        )
    else:
        n, kind = rng.randint(3, 4), rng.choice(kinds)
        meta.update(
            prompt=f"a row of {NUMBER_WORDS[n]} {PLURALS[kind]} in different colours on a {bg} background",
            objects=[_clause(kind, n)],
            distinct_colors=True,
            layout="row",
        )
    meta["prompt"] = meta.pop("prompt")  # keep "prompt" last, like the GenEval rows
    return meta


def aesthetic_rows(split: str, seed: int = 0) -> list[dict[str, Any]]:
    """The rows of ``aesthetic_<split>.jsonl``: distinct captions, split by a salted hash."""
    rng = random.Random(f"aesthetic-{seed}")
    want_test, num_rows = split == "test", AESTHETIC_ROWS[SPLITS.index(split)]
    rows: dict[str, dict[str, Any]] = {}
    for _ in range(200 * num_rows):  # the caption space (~3.3k) is far larger than both splits
        meta = random_aesthetic_meta(rng)
        if _in_test(meta["prompt"], AESTHETIC_TEST_FRACTION, seed) == want_test:
            rows.setdefault(meta["prompt"], meta)
            if len(rows) == num_rows:
                return list(rows.values())
    raise RuntimeError(f"aesthetic grammar yields fewer than {num_rows} distinct {split} captions")


# --------------------------------------------------------------------------- files

_REGENERATE = (
    "regenerate with `python -c 'from opd.data.world.grammar import write_prompt_files; "
    "write_prompt_files()'`"
)


def _rows(task: str, split: str, seed: int) -> list[dict[str, Any]]:
    builders = {"geneval": geneval_rows, "ocr": ocr_rows, "aesthetic": aesthetic_rows}
    return builders[task](split, seed)


def prompt_file(task: str, split: str, path: str | Path | None = None) -> Path:
    """``<path or DEFAULT_DATA_DIR>/<task>_<split>.jsonl``; ``path`` may also name the file itself."""
    if task not in TASKS or split not in SPLITS:
        raise ValueError(f"unknown prompt set {task!r}/{split!r}; tasks are {TASKS}, splits {SPLITS}")
    base = Path(path) if path is not None else DEFAULT_DATA_DIR
    return base if base.suffix == ".jsonl" else base / f"{task}_{split}.jsonl"


def load_prompts(task: str, split: str = "train", path: str | Path | None = None) -> list[dict[str, Any]]:
    """The metadata rows of a prompt set (each has ``tag`` and ``prompt``)."""
    file = prompt_file(task, split, path)
    if not file.is_file():
        raise FileNotFoundError(f"prompt file {file} is missing; {_REGENERATE}")
    rows = []
    for number, line in enumerate(file.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{file}:{number} is not valid JSON ({err}); {_REGENERATE}") from err
    if not rows:
        raise ValueError(f"prompt file {file} is empty; {_REGENERATE}")
    return rows


def write_prompt_files(out_dir: str | Path = DEFAULT_DATA_DIR, seed: int = 0) -> list[Path]:
    """(Re)generate every ``<task>_<split>.jsonl`` under ``out_dir``; same seed, same bytes."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for task, split in itertools.product(TASKS, SPLITS):
        file = out / f"{task}_{split}.jsonl"
        file.write_text("".join(json.dumps(row) + "\n" for row in _rows(task, split, seed)))
        written.append(file)
    return written
