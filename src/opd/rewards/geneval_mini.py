"""A GenEval-style rule judge for the mini world (``opd.data.world``).

GenEval runs an object detector, classifies each object's colour with CLIP and checks counts,
colours and relative positions against the prompt's metadata. Here every object is a flat shape
in a known palette, so detection is exact geometry instead of a network:

1. background colour = median of the image's outer frame;
2. each pixel joins its nearest palette colour if that colour is nearer than the background and
   within ``max_color_dist`` (RGB, 0-255 units) — tolerant to a generator's imperfect colours;
3. a 4-neighbour opening per colour removes 1-2 px fringes and speckle, then 4-connected
   components of at least ``min_area_frac`` of the image become candidate objects;
4. each candidate's mask (grown back by its own-colour neighbours the opening removed) is compared
   (soft IoU) with a circle, a square and an upward triangle of the same area and centre of mass;
   the best IoU is the class and the *confidence*. Candidates below ``min_score`` or more
   elongated than ``max_aspect`` (e.g. two merged shapes) are not objects.

Scoring (ALGORITHMS.md §4):

- ``"correct"``: GenEval's strict per-prompt correctness, as its ``evaluate_images.py`` does it.
  For each ``include`` clause the ``count`` most confident detections of the class must exist
  (*at least* ``count``: extra objects pass); a required colour must hold for all of them; a
  position ``[rel, i]`` must hold between each of them and each object matched by clause ``i``
  (which must itself have matched), using GenEval's relation test (box centres, margin 0.1 of the
  summed box sizes; :func:`opd.data.world.scene.relations`). An ``exclude`` clause fails when at
  least ``count`` objects of its class are found — this is how GenEval makes counting exact.
- ``"reward"``: Flow-GRPO's partial training score, the mean of per-clause sub-scores: count
  ``1 - |n - n_found| / n`` over *all* detections of the class (negative when far too many); if the
  count is wrong, 0 for each colour/position the clause asks; else colour ``1 - |n - n_match| / n``
  and position 1 or 0. ``exclude`` is ignored. ``reference_quirk=True`` reproduces the reference's
  extra 1 appended after every position check (a failed position then scores ``[0, 1]``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from opd.data.world.scene import OBJECT_COLORS, SHAPE_KINDS, relations
from opd.rewards.base import Reward, check_batch, to_uint8_hwc
from opd.rewards.geneval_rules import partial_score_with

_PALETTE_NAMES: tuple[str, ...] = tuple(OBJECT_COLORS)
_PALETTE = np.array([OBJECT_COLORS[c] for c in _PALETTE_NAMES], dtype=np.float32)  # [P, 3]
_SHIFTS = ((0, 1), (0, -1), (1, 0), (-1, 0))
#: GenEval keeps at most 16 detections per class
MAX_PER_CLASS = 16
#: a palette colour this close to the background cannot be told apart from it, so it is ignored
_BACKGROUND_CONFUSION = 60.0


@dataclass(frozen=True)
class Detection:
    """One detected shape. ``bbox`` = (x0, y0, x1, y1) pixels, x1/y1 exclusive; ``centroid`` = (x, y)
    in the same continuous pixel coordinates (a pixel's centre is at +0.5)."""

    cls: str
    color: str
    bbox: tuple[int, int, int, int]
    centroid: tuple[float, float]
    area: int
    score: float  # soft IoU with the class template: the detector's confidence


# --------------------------------------------------------------------------- segmentation


def _shift(a: np.ndarray, dy: int, dx: int, fill: int | bool = 0) -> np.ndarray:
    """``out[y, x] = a[y + dy, x + dx]`` (``fill`` outside the image); ``a`` is ``[H, W]``."""
    h, w = a.shape
    padded = np.pad(a, 1, constant_values=fill)
    return padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]


def color_labels(image: np.ndarray, max_color_dist: float = 100.0) -> np.ndarray:
    """``[H, W, 3]`` uint8 → ``[H, W]`` int: 0 = background/unknown, k + 1 = palette colour k."""
    pixels = image.astype(np.float32)
    h, w = pixels.shape[:2]
    frame = max(1, min(h, w) // 32)
    border = np.concatenate(
        [
            pixels[:frame].reshape(-1, 3),
            pixels[-frame:].reshape(-1, 3),
            pixels[:, :frame].reshape(-1, 3),
            pixels[:, -frame:].reshape(-1, 3),
        ]
    )
    background = np.median(border, axis=0)
    dist = np.linalg.norm(pixels[:, :, None, :] - _PALETTE, axis=-1)  # [H, W, P]
    dist[:, :, np.linalg.norm(_PALETTE - background, axis=-1) < _BACKGROUND_CONFUSION] = np.inf
    nearest, nearest_dist = dist.argmin(-1), dist.min(-1)
    is_object = (nearest_dist < np.linalg.norm(pixels - background, axis=-1)) & (
        nearest_dist <= max_color_dist
    )
    return np.where(is_object, nearest + 1, 0)


def open_labels(labels: np.ndarray) -> np.ndarray:
    """Morphological opening of every label with a 4-neighbour cross (drops fringes < 3 px wide)."""
    same = [_shift(labels, dy, dx) == labels for dy, dx in _SHIFTS]
    core = (labels > 0) & np.logical_and.reduce(same)
    keep = core | np.logical_or.reduce(
        [s & _shift(core, dy, dx, False) for s, (dy, dx) in zip(same, _SHIFTS, strict=True)]
    )
    return np.where(keep, labels, 0)


def components(labels: np.ndarray) -> np.ndarray:
    """4-connected components of equal nonzero labels: ``[H, W]`` ids (pixel index of the root), -1 off."""
    h, w = labels.shape
    none = h * w
    ids = np.where(labels > 0, np.arange(none).reshape(h, w), none)
    while True:
        new = ids.copy()
        for dy, dx in _SHIFTS:
            linked = (_shift(labels, dy, dx) == labels) & (labels > 0)
            new = np.where(linked, np.minimum(new, _shift(ids, dy, dx, none)), new)
        flat = new.reshape(-1)  # a view: writing it updates `new`
        on = flat < none
        flat[on] = flat[flat[on]]  # pointer jumping (adopt the id of one's id): far fewer rounds
        if np.array_equal(new, ids):
            return np.where(ids < none, ids, -1)
        ids = new


# --------------------------------------------------------------------------- shape classes


def _template(kind: str, cx: float, cy: float, area: float, shape: tuple[int, int]) -> np.ndarray:
    """Pixel coverage ``[h, w]`` of an upright ``kind`` of ``area`` px with its centre of mass at (cx, cy)."""
    sub = 4  # sub-pixel samples per axis: soft edges like an anti-aliased render
    h, w = shape
    xx, yy = np.meshgrid((np.arange(w * sub) + 0.5) / sub - cx, (np.arange(h * sub) + 0.5) / sub - cy)
    if kind == "circle":
        inside = xx**2 + yy**2 <= area / np.pi
    elif kind == "square":
        inside = np.maximum(np.abs(xx), np.abs(yy)) <= np.sqrt(area) / 2
    else:  # triangle, base = height = s; its centroid lies 2/3 of the height below the apex
        side = np.sqrt(2 * area)
        depth = (yy + 2 * side / 3) / side  # 0 at the apex, 1 at the base
        inside = (depth >= 0) & (depth <= 1) & (np.abs(xx) <= depth * side / 2)
    return inside.reshape(h, sub, w, sub).mean(axis=(1, 3))


def classify(mask: np.ndarray) -> tuple[str, float]:
    """Best-matching shape kind of a binary ``[h, w]`` mask, and its soft IoU (the confidence).

    Each template has the mask's area and centre of mass, so the fit depends on integral moments
    rather than on the bounding box, which one ragged edge row (blur, noise) would distort.
    """
    ys, xs = np.nonzero(mask)
    cx, cy, area = xs.mean() + 0.5, ys.mean() + 0.5, float(len(xs))
    best, best_iou = SHAPE_KINDS[0], -1.0
    for kind in SHAPE_KINDS:
        template = _template(kind, cx, cy, area, mask.shape)
        iou = float(np.minimum(template, mask).sum() / np.maximum(template, mask).sum())
        if iou > best_iou:
            best, best_iou = kind, iou
    return best, best_iou


def _grow(mask: np.ndarray) -> np.ndarray:
    """8-neighbour dilation of a boolean ``[H, W]`` mask."""
    out = mask.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            out |= _shift(mask, dy, dx, False)
    return out


def _candidate(
    component: np.ndarray, raw: np.ndarray, label: int, min_score: float, max_aspect: float
) -> Detection | None:
    """Measure one component (boolean ``[H, W]``); ``None`` if it is not a shape."""
    # the opening found the object; its own-colour pixels next to it (corners, tips) belong to it too
    mask = _grow(component) & (raw == label)
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    if max(x1 - x0, y1 - y0) > max_aspect * min(x1 - x0, y1 - y0):
        return None  # e.g. two shapes merged side by side
    pad = 3  # room for the template where the mask falls short of it
    kind, score = classify(np.pad(mask, pad)[y0 : y1 + 2 * pad, x0 : x1 + 2 * pad])
    if score < min_score:
        return None
    centroid = (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5)
    return Detection(kind, _PALETTE_NAMES[label - 1], (x0, y0, x1, y1), centroid, len(xs), score)


def detect(
    image: np.ndarray,
    min_score: float = 0.7,
    min_area_frac: float = 0.005,
    max_aspect: float = 1.6,
    max_color_dist: float = 100.0,
) -> list[Detection]:
    """Shapes in an ``[H, W, 3]`` uint8 RGB image, most confident first (see the module docstring)."""
    raw = color_labels(image, max_color_dist)
    opened = open_labels(raw)
    ids = components(opened)
    roots, areas = np.unique(ids[ids >= 0], return_counts=True)
    min_area = min_area_frac * image.shape[0] * image.shape[1]
    found = []
    for root, area in zip(roots, areas, strict=True):
        if area >= min_area:
            det = _candidate(ids == root, raw, int(opened.flat[root]), min_score, max_aspect)
            found += [det] if det is not None else []
    return sorted(found, key=lambda d: -d.score)


def by_class(detections: list[Detection]) -> dict[str, list[Detection]]:
    """Group detections by class, most confident first, at most ``MAX_PER_CLASS`` each."""
    grouped: dict[str, list[Detection]] = defaultdict(list)
    for det in sorted(detections, key=lambda d: -d.score):
        if len(grouped[det.cls]) < MAX_PER_CLASS:
            grouped[det.cls].append(det)
    return dict(grouped)


# --------------------------------------------------------------------------- GenEval logic


def _holds(found: list[Detection], relation: str, targets: list[Detection]) -> bool:
    return all(relation in relations(obj.bbox, ref.bbox) for obj in found for ref in targets)


def _position_ok(found: list[Detection], position: list, groups: list[list[Detection] | None]) -> bool:
    rel, target = position
    return groups[target] is not None and _holds(found, rel, groups[target])


def strict_correct(objects: dict[str, list[Detection]], meta: dict[str, Any]) -> bool:
    """GenEval's binary correctness of one image (see the module docstring)."""
    correct, groups = True, []
    for clause in meta["include"]:
        found = objects.get(clause["class"], [])[: clause["count"]]
        ok = len(found) >= clause["count"]
        if ok and "color" in clause:
            ok = sum(d.color == clause["color"] for d in found) >= clause["count"]
        if ok and "position" in clause:
            ok = _position_ok(found, clause["position"], groups)
        groups.append(found if ok else None)
        correct &= ok
    for clause in meta.get("exclude", []):
        correct &= len(objects.get(clause["class"], [])) < clause["count"]
    return correct


def partial_score(
    objects: dict[str, list[Detection]], meta: dict[str, Any], reference_quirk: bool = False
) -> float:
    """Flow-GRPO's partial GenEval reward of one image (see the module docstring); the rule itself is
    :func:`opd.rewards.geneval_rules.partial_score_with`, shared with the real-scale judge."""
    return partial_score_with(objects, meta, lambda d: d.color, _holds, reference_quirk)


class GenEvalMini(Reward):
    """The mini world's GenEval: ``score`` → ``{"reward": partial score, "correct": strict 0/1}``.

    Metadata rows must follow GenEval's schema (``include``/``exclude``; see
    ``opd.data.world.grammar``). Images ``[B, 3, H, W]`` in [0, 1]; outputs ``Tensor[B]`` float32 (CPU).
    """

    name = "geneval"

    def __init__(
        self,
        min_score: float = 0.7,
        min_area_frac: float = 0.005,
        max_aspect: float = 1.6,
        max_color_dist: float = 100.0,
        reference_quirk: bool = False,
    ) -> None:
        self.detect_kwargs = {
            "min_score": min_score,
            "min_area_frac": min_area_frac,
            "max_aspect": max_aspect,
            "max_color_dist": max_color_dist,
        }
        self.reference_quirk = reference_quirk

    def score(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> dict[str, Tensor]:
        check_batch(images, prompts, metadata)
        correct, reward = [], []
        for i, (image, meta) in enumerate(zip(to_uint8_hwc(images), metadata, strict=True)):
            if "include" not in meta:
                raise ValueError(
                    f"GenEvalMini: metadata[{i}] (prompt {prompts[i]!r}) has no 'include' key; it "
                    f"needs GenEval-schema rows such as load_prompts('geneval', ...)"
                )
            objects = by_class(detect(image, **self.detect_kwargs))
            correct.append(float(strict_correct(objects, meta)))
            reward.append(partial_score(objects, meta, self.reference_quirk))
        return {"reward": torch.tensor(reward, dtype=torch.float32), "correct": torch.tensor(correct)}
