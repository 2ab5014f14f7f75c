"""Prompt grammar of the mini world: three task prompt sets and their train/val/test splits.

Tasks and their metadata (one JSON object per line in ``data/mini/<task>_<split>.jsonl``):

- ``geneval``: GenEval's ``*_metadata.jsonl`` schema, shape kinds as classes::

      {"tag": "position", "include": [{"class": "circle", "count": 1},
       {"class": "star", "count": 1, "position": ["left of", 0]}], "exclude": [],
       "prompt": "a photo of a star left of a circle"}

  Tags ``single_object``, ``two_object``, ``counting`` (2-4; ``exclude`` holds ``count + 1`` as in
  GenEval), ``colors``, ``position`` (clause 1 lies ``rel`` of clause 0) and ``color_attr``; each
  prompt opens with one of ``GENEVAL_TEMPLATES`` ("a photo of", "a drawing of", ...).
  **Held-out compositions**: every entry has a *composition* — the (template, kind) pair of a
  single object, the unordered kind pair of two objects and of a position prompt, the
  (count, kind) pair of a counting prompt, the (colour, kind) pairs of colour prompts — and a
  salted hash ranks the compositions of each kind into test (``TEST_FRACTION``), val
  (``VAL_FRACTION``) and train. A colour-attribution prompt is test (val) when either of its
  colour-shape pairs is. So "a photo of a purple star" is in test only if no train or val prompt
  pairs purple with star, and a test position prompt names a kind pair that train never shows
  together. Test and val list each prompt once (at most ``GENEVAL_EVAL_PER_TAG`` per tag);
  train rows cycle through the tag's prompts, every tag equally often.
- ``ocr``: ``{"tag": "ocr", "prompt": 'a sign that says "CAT"', "text": "CAT"}``; 3-character
  upper-case strings (English words, numbers, mixed). A salted hash of the string sends
  ``OCR_TEST_FRACTION`` of the vocabulary to test and ``OCR_VAL_FRACTION`` to val; pre-training
  never draws a val or test string.
- ``aesthetic``: captions of whole scenes (``"a red circle and a blue star on a navy
  background"``) with ``{"tag": "aesthetic", "prompt": ..., "background": ..., "objects": [...]}``;
  ``objects`` lists what the caption states (``class``/``color`` where named, ``count``) so that
  :func:`opd.data.world.layout.scene_for` can draw it and ``rewards/aesthetic_mini.py`` can check
  it; ``distinct_colors``/``layout``/``scale`` are optional. Split by a salted hash of the caption.

Pre-training (:func:`opd.data.world.layout.random_scene`) draws GenEval-style captions from the
train compositions only and rejects any caption of a val or test set (:func:`held_out_prompts`),
so no evaluation prompt string is ever a training string. All randomness flows from the
``random.Random`` passed in.
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
from opd.utils.paths import checkout_root

TASKS: tuple[str, ...] = ("geneval", "ocr", "aesthetic")
SPLITS: tuple[str, ...] = ("train", "val", "test")
GENEVAL_TAGS: tuple[str, ...] = (
    "single_object",
    "two_object",
    "counting",
    "colors",
    "position",
    "color_attr",
)
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
COUNTS: tuple[int, ...] = (2, 3, 4)
GENEVAL_TEMPLATES: tuple[str, ...] = ("a photo of", "a picture of", "an image of", "a drawing of", "a render of")

#: shares of each composition space held out for test and val (the rest is train)
TEST_FRACTION = 0.2
VAL_FRACTION = 0.1
OCR_TEST_FRACTION = 0.12
OCR_VAL_FRACTION = 0.08
#: GenEval train rows per tag (cycling through the tag's train prompts); val/test: unique prompts, capped
GENEVAL_TRAIN_ROWS_PER_TAG = 334
GENEVAL_EVAL_PER_TAG = {"val": 30, "test": 70}
#: distinct aesthetic captions per split
AESTHETIC_ROWS = {"train": 1000, "val": 100, "test": 200}

#: where write_prompt_files puts the committed prompt sets: <repo>/data/mini
DEFAULT_DATA_DIR = checkout_root() / "data" / "mini"

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


def _ranked_split(keys: list[str], salt: str, seed: int, test: float = TEST_FRACTION,
                  val: float = VAL_FRACTION) -> dict[str, str]:
    """Key → split: the ``ceil(test·n)`` keys of lowest salted hash are test, the next ``ceil(val·n)``
    val, the rest train (exact shares, so even small composition spaces get both held-out sets)."""
    ranked = sorted(keys, key=lambda k: _hash_unit(f"{salt}:{k}", seed))
    num_test, num_val = math.ceil(test * len(keys)), math.ceil(val * len(keys))
    return {k: "test" if i < num_test else "val" if i < num_test + num_val else "train"
            for i, k in enumerate(ranked)}


def _hash_split(key: str, seed: int, test: float, val: float) -> str:
    """Split of one key of a large space by its salted hash (test below ``test``, then val)."""
    u = _hash_unit(key, seed)
    return "test" if u < test else "val" if u < test + val else "train"


# --------------------------------------------------------------------------- geneval


def _clause(
    kind: str | None = None, count: int = 1, color: str | None = None, position: list | None = None
) -> dict[str, Any]:
    clause: dict[str, Any] = {} if kind is None else {"class": kind}
    clause["count"] = count
    if color is not None:
        clause["color"] = color
    if position is not None:
        clause["position"] = position
    return clause


def _geneval(tag: str, include: list[dict], prompt: str, exclude: list[dict] | None = None) -> dict[str, Any]:
    return {"tag": tag, "include": include, "exclude": exclude or [], "prompt": prompt}


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _pair_key(a: str, b: str) -> str:
    return "|".join(sorted((a, b)))


@lru_cache(maxsize=4)
def _composition_splits(seed: int) -> dict[str, dict[str, str]]:
    """Composition → split, per composition family (see the module docstring)."""
    kinds, colours = SHAPE_KINDS, tuple(OBJECT_COLORS)
    return {
        "single": _ranked_split([f"{t}|{k}" for t in GENEVAL_TEMPLATES for k in kinds], "single", seed),
        "pair": _ranked_split([_pair_key(a, b) for a, b in itertools.combinations(kinds, 2)], "pair", seed),
        "count": _ranked_split([f"{n}|{k}" for n in COUNTS for k in kinds], "count", seed),
        "colour": _ranked_split([f"{c}|{k}" for c in colours for k in kinds], "colour", seed),
    }


def _worst(*splits: str) -> str:
    """The most held-out of several splits (a prompt with any test composition is test)."""
    return "test" if "test" in splits else "val" if "val" in splits else "train"


def _geneval_entries(tag: str, seed: int) -> list[tuple[str, dict[str, Any]]]:
    """Every ``(split, entry)`` of ``tag``, in a fixed order."""
    comp = _composition_splits(seed)
    out: list[tuple[str, dict[str, Any]]] = []
    for t in GENEVAL_TEMPLATES:
        if tag == "single_object":
            out += [(comp["single"][f"{t}|{k}"], _geneval(tag, [_clause(k)], f"{t} {_article(k)}"))
                    for k in SHAPE_KINDS]
        elif tag == "two_object":
            out += [(comp["pair"][_pair_key(a, b)],
                     _geneval(tag, [_clause(a), _clause(b)], f"{t} {_article(a)} and {_article(b)}"))
                    for a, b in itertools.permutations(SHAPE_KINDS, 2)]
        elif tag == "counting":
            out += [(comp["count"][f"{n}|{k}"],
                     _geneval(tag, [_clause(k, n)], f"{t} {NUMBER_WORDS[n]} {PLURALS[k]}", [_clause(k, n + 1)]))
                    for n in COUNTS for k in SHAPE_KINDS]
        elif tag == "colors":
            out += [(comp["colour"][f"{c}|{k}"], _geneval(tag, [_clause(k, color=c)], f"{t} {_article(c)} {k}"))
                    for c in OBJECT_COLORS for k in SHAPE_KINDS]
        elif tag == "position":
            # GenEval's encoding: clause 1 is `rel` of clause 0, and the prompt names clause 1 first
            out += [(comp["pair"][_pair_key(a, b)],
                     _geneval(tag, [_clause(a), _clause(b, position=[rel, 0])],
                              f"{t} {_article(b)} {rel} {_article(a)}"))
                    for a, b in itertools.permutations(SHAPE_KINDS, 2) for rel in RELATIONS]
        elif tag == "color_attr":
            out += [(_worst(comp["colour"][f"{ca}|{a}"], comp["colour"][f"{cb}|{b}"]),
                     _geneval(tag, [_clause(a, color=ca), _clause(b, color=cb)],
                              f"{t} {_article(ca)} {a} and {_article(cb)} {b}"))
                    for a, b in itertools.permutations(SHAPE_KINDS, 2)
                    for ca, cb in itertools.permutations(OBJECT_COLORS, 2)]
        else:
            raise ValueError(f"unknown GenEval tag {tag!r}; expected one of {GENEVAL_TAGS}")
    return out


def geneval_pool(tag: str, seed: int = 0) -> list[dict[str, Any]]:
    """Every distinct GenEval entry of ``tag`` in this world (all splits), in a fixed order."""
    return [entry for _, entry in _geneval_entries(tag, seed)]


def geneval_split(tag: str, split: str, seed: int = 0) -> list[dict[str, Any]]:
    """The distinct entries of ``tag`` whose composition belongs to ``split``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return [entry for where, entry in _geneval_entries(tag, seed) if where == split]


def _cycle_rows(pool: list[dict], num_rows: int, rng: random.Random) -> list[dict]:
    """``num_rows`` entries cycling through shuffled passes over ``pool`` (balanced coverage)."""
    rows: list[dict] = []
    while len(rows) < num_rows:
        order = list(pool)
        rng.shuffle(order)
        rows.extend(order)
    return rows[:num_rows]


def geneval_rows(split: str, seed: int = 0) -> list[dict[str, Any]]:
    """The rows of ``geneval_<split>.jsonl``: train cycles every tag equally often; val and test
    list up to ``GENEVAL_EVAL_PER_TAG[split]`` distinct prompts per tag, sampled evenly."""
    rng = random.Random(f"geneval-{split}-{seed}")
    rows = []
    for tag in GENEVAL_TAGS:
        pool = geneval_split(tag, split, seed)
        if split == "train":
            rows += _cycle_rows(pool, GENEVAL_TRAIN_ROWS_PER_TAG, rng)
        else:
            rows += rng.sample(pool, min(len(pool), GENEVAL_EVAL_PER_TAG[split]))
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
def ocr_splits(seed: int = 0) -> dict[str, str]:
    """String → split (test, val or train) by a salted hash of the string."""
    return {t: _hash_split(t, seed, OCR_TEST_FRACTION, OCR_VAL_FRACTION) for t in ocr_vocabulary(seed)}


@lru_cache(maxsize=4)
def ocr_test_strings(seed: int = 0) -> frozenset[str]:
    """Strings held out for testing; never used for training or pre-training."""
    return frozenset(t for t, where in ocr_splits(seed).items() if where == "test")


@lru_cache(maxsize=4)
def ocr_held_out_strings(seed: int = 0) -> frozenset[str]:
    """Val and test strings: pre-training and training never draw them."""
    return frozenset(t for t, where in ocr_splits(seed).items() if where != "train")


def ocr_meta(text: str) -> dict[str, Any]:
    return {"tag": "ocr", "prompt": OCR_TEMPLATE.format(text), "text": text}


def ocr_rows(split: str, seed: int = 0) -> list[dict[str, Any]]:
    """The rows of ``ocr_<split>.jsonl``: every string of the split once, shuffled."""
    splits = ocr_splits(seed)
    texts = [t for t in ocr_vocabulary(seed) if splits[t] == split]
    random.Random(f"ocr-{split}-{seed}").shuffle(texts)
    return [ocr_meta(t) for t in texts]


@lru_cache(maxsize=4)
def _ocr_train_strings(seed: int) -> tuple[str, ...]:
    splits = ocr_splits(seed)
    return tuple(t for t in ocr_vocabulary(seed) if splits[t] == "train")


def random_text(rng: random.Random, seed: int = 0) -> str:
    """A training string: half from the training vocabulary, half uniformly random (never val or test)."""
    held_out = ocr_held_out_strings(seed)
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
        scale, kind, color = rng.choice(["small", "large", None]), rng.choice(kinds), rng.choice(colors)
        meta.update(
            prompt=f"{_article(scale) + ' ' + color if scale else _article(color)} {kind} on a {bg} background",
            objects=[_clause(kind, color=color)],
        )
        if scale:
            meta["scale"] = scale
    elif style == "pair":
        (ka, kb), (ca, cb) = rng.sample(kinds, 2), distinct_colors(rng, 2)
        meta.update(
            prompt=f"{_article(ca)} {ka} and {_article(cb)} {kb} on a {bg} background",
            objects=[_clause(ka, color=ca), _clause(kb, color=cb)],
        )
    elif style == "trio":
        (ka, kb, kc), (ca, cb, cc) = rng.sample(kinds, 3), distinct_colors(rng, 3)
        meta.update(
            prompt=f"{_article(ca)} {ka}, {_article(cb)} {kb} and {_article(cc)} {kc} on a {bg} background",
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
            objects=[_clause(count=n)],
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


def aesthetic_split(prompt: str, seed: int = 0) -> str:
    """The split of an aesthetic caption (a salted hash of the caption string)."""
    return _hash_split(f"aesthetic:{prompt}", seed, TEST_FRACTION, VAL_FRACTION)


def aesthetic_rows(split: str, seed: int = 0) -> list[dict[str, Any]]:
    """The rows of ``aesthetic_<split>.jsonl``: distinct captions, split by a salted hash."""
    rng = random.Random(f"aesthetic-{seed}")
    num_rows = AESTHETIC_ROWS[split]
    rows: dict[str, dict[str, Any]] = {}
    for _ in range(200 * num_rows):  # the caption space (~60k) is far larger than every split
        meta = random_aesthetic_meta(rng)
        if aesthetic_split(meta["prompt"], seed) == split:
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


@lru_cache(maxsize=4)
def held_out_prompts(seed: int = 0) -> frozenset[str]:
    """Every prompt string of a val or test set (all tasks): training streams must never draw one."""
    return frozenset(row["prompt"] for task in TASKS for split in ("val", "test") for row in _rows(task, split, seed))


def prompt_file(task: str, split: str, path: str | Path | None = None) -> Path:
    """``<path or <paths.root_dir>/data/mini>/<task>_<split>.jsonl``; ``path`` may also name the file itself
    (the root is the checkout's, or ``$OPD_ROOT`` for an installed copy: :func:`opd.config.config_root_dir`)."""
    if task not in TASKS or split not in SPLITS:
        raise ValueError(f"unknown prompt set {task!r}/{split!r}; tasks are {TASKS}, splits {SPLITS}")
    if path is None:
        from opd.config import config_root_dir

        path = Path(config_root_dir()) / "data" / "mini"
    base = Path(path)
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
