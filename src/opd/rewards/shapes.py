"""The mini world's object detector: flat shapes found by colour and named by their outline.

GenEval finds objects with a detector network; here every object is a flat shape of a known
outline (``opd.data.world.render.kind_mask``) in a known palette, so detection is geometry. Both
mini judges read it (``geneval_mini``: what is drawn; ``aesthetic_mini``: how well):

1. background colour = median of the image's outer frame;
2. each pixel joins its nearest palette colour if that colour is nearer than the background and
   within ``max_color_dist`` (RGB, 0-255 units) — tolerant to a generator's imperfect colours;
3. a 4-neighbour opening per colour removes 1-2 px fringes and speckle; every 4-connected
   component of at least ``MIN_AREA_FRAC`` of the image is an *object*, whatever its shape;
   own-colour pixels within 2 px of it (thin tips and horns the opening cut) join it again;
4. its *coverage* is 1 inside, and on its edge and the 1-px rim around it each pixel's share of
   the object colour in a mix with the background (anti-aliased and blurred edges count in part);
5. the coverage is compared (soft IoU) with a template of every kind in ``SHAPE_KINDS``:
   ``kind_mask`` with the kind's ``ASPECT``, scaled to the object's area and placed at its centre
   of mass, drawn at 4x and box-filtered like the renderer, sharp and Gaussian-blurred
   (``TEMPLATE_BLURS``, the better fit counts). The object gets the best kind only if its IoU is
   at least ``MIN_SCORE`` *and* leads the second best by ``MARGIN``; an object whose box side is
   outside [``MIN_SIZE``, ``MAX_SIZE``] canvas px (64-px canvas units) gets no template at all.
   Either way a rejected object stays an object, of no kind (``Detection.cls = None``).

Thresholds, measured on single renders of every kind at every width 10-38 px (2 per width, random
colour, background and sub-pixel centre; 580 per condition):

- clean: the own template's IoU is >= 0.913 (>= 0.930 from 14 px); no other template exceeds
  0.86 on any kind, and the own template leads by >= 0.105 (a 10-px diamond against the circle);
- blur 0.6 px + noise sigma 0.05: own IoU >= 0.838 / lead >= 0.062 at 14-38 px (1st percentile
  0.864 / 0.078), >= 0.829 / 0.053 at 12-13 px, >= 0.787 / 0.022 at 10-11 px;
- outlines that are no kind reach 0.79-0.83 with their best template (a 2:1 rectangle or a 0.6
  ellipse as a semicircle, a downward triangle as a heart, a quarter disc as a square), 0.75-0.78
  (two merged circles), or lead by < 0.05 (0.75 ellipses: circle vs diamond, L shapes, star-like
  blobs, random polygons).

``MIN_SCORE = 0.84`` sits above those non-kind fits and 0.07 below the clean minimum; ``MARGIN =
0.05`` is half the smallest clean lead. With them every clean render is its own kind, blurred and
noisy ones are at 14-38 px 99.8%, at 12-13 px 95%, at 10-11 px 72% (the rest: no kind), and no
render in any condition (also blur 1 px + noise 0.08) was taken for another kind. ``MIN_SIZE = 4``
/ ``MAX_SIZE = 40``: scenes draw kinds 12-38 px wide (a semicircle is half as tall, 5 px at a
10-px width); a half-canvas block or a 50-px shape is not a kind. Near-kinds stay accepted: a
regular hexagon or octagon reads as a circle (IoU 0.93-0.96), a rounded square as a square (0.93).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np

from opd.data.world.render import kind_mask
from opd.data.world.scene import ASPECT, CANVAS, OBJECT_COLORS, SHAPE_KINDS

_PALETTE_NAMES: tuple[str, ...] = tuple(OBJECT_COLORS)
_PALETTE = np.array([OBJECT_COLORS[c] for c in _PALETTE_NAMES], dtype=np.float32)  # [P, 3]
_SHIFTS = ((0, 1), (0, -1), (1, 0), (-1, 0))
#: GenEval keeps at most 16 detections per class
MAX_PER_CLASS = 16
#: a palette colour this close to the background cannot be told apart from it, so it is ignored
_BACKGROUND_CONFUSION = 60.0

#: classification thresholds (soft IoU with the best template; lead over the second best)
MIN_SCORE = 0.84
MARGIN = 0.05
#: accepted object box sides, in 64-px canvas units
MIN_SIZE = 4.0
MAX_SIZE = 40.0
#: least component area, as a fraction of the image
MIN_AREA_FRAC = 0.005
#: Gaussian blurs (sigma, px) each template is tried at (0: sharp); the best fit counts
TEMPLATE_BLURS: tuple[float, ...] = (0.0, 0.8)
#: sub-pixel samples per axis of a template (the renderer draws at 4x and box-filters down); fewer
#: for patches over ``_SUPERSAMPLED // _SUB`` px (large renders), so a template stays <= 192 px
_SUB = 4
_SUPERSAMPLED = 192
#: side of the raster each kind's area fraction is measured on
_UNIT = 512


@dataclass(frozen=True)
class Detection:
    """One detected object. ``cls`` is its shape kind, or ``None`` for an object of no kind (no
    template fits clearly, or its box is outside the size limits). ``bbox`` = (x0, y0, x1, y1)
    pixels, x1/y1 exclusive; ``centroid`` = (x, y) in the same continuous pixel coordinates (a
    pixel's centre is at +0.5); ``area`` in pixels; ``score`` the best template's soft IoU (0 when
    the size limits rejected the object before any fit)."""

    cls: str | None
    color: str
    bbox: tuple[int, int, int, int]
    centroid: tuple[float, float]
    area: int
    score: float


# --------------------------------------------------------------------------- segmentation


def _shift(a: np.ndarray, dy: int, dx: int, fill: int | bool = 0) -> np.ndarray:
    """``out[y, x] = a[y + dy, x + dx]`` (``fill`` outside the image); ``a`` is ``[H, W]``, |dy|, |dx| <= 1."""
    h, w = a.shape
    out = np.full_like(a, fill)
    out[max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)] = a[
        max(dy, 0) : h - max(-dy, 0), max(dx, 0) : w - max(-dx, 0)
    ]
    return out


def background_color(image: np.ndarray) -> np.ndarray:
    """Per-channel median of the outer frame (``min(H, W) // 32`` px, at least 1) of ``[H, W, 3]``."""
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
    return np.median(border, axis=0)


def color_labels(
    image: np.ndarray, max_color_dist: float = 100.0, background: np.ndarray | None = None
) -> np.ndarray:
    """``[H, W, 3]`` uint8 → ``[H, W]`` int: 0 = background/unknown, k + 1 = palette colour k."""
    pixels = image.astype(np.float32)
    background = background_color(image) if background is None else background
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


def _grow(mask: np.ndarray) -> np.ndarray:
    """8-neighbour dilation of a boolean ``[H, W]`` mask (a 3 x 3 square, applied per axis)."""
    rows = mask | _shift(mask, 0, 1, False) | _shift(mask, 0, -1, False)
    return rows | _shift(rows, 1, 0, False) | _shift(rows, -1, 0, False)


# --------------------------------------------------------------------------- templates


@cache
def _area_fraction(kind: str) -> float:
    """The share of its box that ``kind`` covers."""
    mask = np.asarray(kind_mask(kind, _UNIT, round(_UNIT * ASPECT[kind])), dtype=np.float32)
    return float(mask.mean() / 255)


@lru_cache(maxsize=2048)
def _raster(kind: str, width: int, height: int) -> tuple[np.ndarray, float, float, float]:
    """``kind_mask`` as uint8 ``[height, width]`` in {0, 1}, with its area and centre of mass (x, y)."""
    mask = (np.asarray(kind_mask(kind, width, height)) > 127).astype(np.uint8)
    area = float(mask.sum())
    if area == 0:
        return mask, 0.0, width / 2, height / 2
    ys, xs = np.nonzero(mask)
    return mask, area, float(xs.mean() + 0.5), float(ys.mean() + 0.5)


@cache
def _gaussian(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian taps out to 2.5 sigma."""
    r = int(np.ceil(2.5 * sigma))
    taps = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    return (taps / taps.sum()).astype(np.float32)


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D array, zero outside it (shifted sums: a few taps)."""
    taps = _gaussian(sigma)
    r, (h, w) = len(taps) // 2, a.shape
    padded = np.zeros((h + 2 * r, w + 2 * r), dtype=np.float32)
    padded[r : r + h, r : r + w] = a
    rows = sum(t * padded[:, i : i + w] for i, t in enumerate(taps))
    return sum(t * rows[i : i + h] for i, t in enumerate(taps))


def template_ious(mask: np.ndarray, kinds: tuple[str, ...] = SHAPE_KINDS) -> np.ndarray:
    """Soft IoU of a coverage mask ``[h, w]`` (values in [0, 1]) with each kind's template → ``[K]``.

    Each template is ``kind_mask`` scaled (with the kind's ``ASPECT``) to the mask's area and placed
    at its centre of mass, drawn at ``_SUB`` x and box-filtered down like the renderer's edges, then
    also blurred (``TEMPLATE_BLURS``; the best fit counts).
    The fit rests on integral moments, not on the bounding box that one ragged row would distort.
    Template parts outside the patch still count in the union.
    """
    h, w = mask.shape
    area = float(mask.sum())
    if area <= 0:
        return np.zeros(len(kinds))
    ys, xs = np.mgrid[0:h, 0:w]
    cx, cy = float((mask * (xs + 0.5)).sum() / area), float((mask * (ys + 0.5)).sum() / area)
    ious = np.empty(len(kinds))
    sub = max(1, min(_SUB, _SUPERSAMPLED // max(h, w)))
    canvas = np.empty((h * sub, w * sub), dtype=np.float32)
    for k, kind in enumerate(kinds):
        frac = _area_fraction(kind)
        width = np.sqrt(area / (frac * ASPECT[kind]))
        raster, r_area, r_cx, r_cy = _raster(
            kind, max(1, round(width * sub)), max(1, round(width * ASPECT[kind] * sub))
        )
        left, top = round(cx * sub - r_cx), round(cy * sub - r_cy)
        canvas.fill(0)
        # the part of the raster inside the patch
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(top + raster.shape[0], h * sub), min(left + raster.shape[1], w * sub)
        if y1 > y0 and x1 > x0:
            canvas[y0:y1, x0:x1] = raster[y0 - top : y1 - top, x0 - left : x1 - left]
        template = canvas.reshape(h, sub, w, sub).sum(axis=(1, 3)) / sub**2
        best = 0.0
        for sigma in TEMPLATE_BLURS:
            blurred = _blur(template, sigma) if sigma else template
            inter = float(np.minimum(blurred, mask).sum())
            best = max(best, inter / (r_area / sub**2 + area - inter))
        ious[k] = best
    return ious


def classify(
    ious: np.ndarray,
    min_score: float = MIN_SCORE,
    margin: float = MARGIN,
    kinds: tuple[str, ...] = SHAPE_KINDS,
) -> tuple[str | None, float]:
    """``(kind, best IoU)``; the kind is ``None`` unless the best IoU is at least ``min_score`` and
    leads the second best by at least ``margin``."""
    order = np.argsort(-ious)
    best, second = float(ious[order[0]]), float(ious[order[1]]) if len(ious) > 1 else 0.0
    return (kinds[order[0]] if best >= min_score and best - second >= margin else None), best


# --------------------------------------------------------------------------- detection


def _coverage(image: np.ndarray, background: np.ndarray, label: int) -> np.ndarray:
    """Per-pixel share of palette colour ``label`` in a mix with the background, clipped to [0, 1]."""
    colour = _PALETTE[label - 1]
    axis = colour - background
    return np.clip((image.astype(np.float32) - background) @ axis / float(axis @ axis), 0.0, 1.0)


@dataclass(frozen=True)
class Blob:
    """A segmented object before classification: its colour's palette index + 1, boolean mask
    ``[H, W]``, and soft coverage ``soft`` of the patch ``patch`` = (y0, x0, y1, x1) around it."""

    label: int
    mask: np.ndarray
    soft: np.ndarray
    patch: tuple[int, int, int, int]


def segment(
    image: np.ndarray,
    min_area_frac: float = MIN_AREA_FRAC,
    max_color_dist: float = 100.0,
    reconstruct: int = 2,
) -> list[Blob]:
    """Candidate objects of an ``[H, W, 3]`` uint8 image (steps 1-4 of the module docstring)."""
    h, w = image.shape[:2]
    background = background_color(image)
    raw = color_labels(image, max_color_dist, background)
    opened = open_labels(raw)
    ids = components(opened)
    roots, areas = np.unique(ids[ids >= 0], return_counts=True)
    blobs = []
    for root, area in zip(roots, areas, strict=True):
        if area < min_area_frac * h * w:
            continue
        label = int(opened.flat[root])
        own = raw == label
        # the opening found the object; own-colour pixels near it (thin tips, horns) belong to it too
        mask = ids == root
        for _ in range(reconstruct):
            mask = _grow(mask) & own
        ys, xs = np.nonzero(mask)
        pad = 2
        y0, x0 = max(int(ys.min()) - pad, 0), max(int(xs.min()) - pad, 0)
        y1, x1 = min(int(ys.max()) + 1 + pad, h), min(int(xs.max()) + 1 + pad, w)
        # soft coverage: the mask's pixels and the background-like pixels at its rim (the
        # anti-aliased edge), each weighted by how much of the object colour it holds
        m = mask[y0:y1, x0:x1]
        rim = _grow(m) & ~m & (opened[y0:y1, x0:x1] == 0)
        interior = m & ~_grow(~m)
        soft = np.where(interior, 1.0, _coverage(image[y0:y1, x0:x1], background, label) * (m | rim))
        blobs.append(Blob(label, mask, soft, (y0, x0, y1, x1)))
    return blobs


def detect(
    image: np.ndarray,
    min_score: float = MIN_SCORE,
    margin: float = MARGIN,
    min_size: float = MIN_SIZE,
    max_size: float = MAX_SIZE,
    min_area_frac: float = MIN_AREA_FRAC,
    max_color_dist: float = 100.0,
) -> list[Detection]:
    """Objects in an ``[H, W, 3]`` uint8 RGB image, most confident first (see the module docstring)."""
    h, w = image.shape[:2]
    found = []
    for blob in segment(image, min_area_frac, max_color_dist):
        ys, xs = np.nonzero(blob.mask)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        centroid = (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5)
        sides = ((x1 - x0) * CANVAS / w, (y1 - y0) * CANVAS / h)
        kind, score = None, 0.0
        if min(sides) >= min_size and max(sides) <= max_size:
            kind, score = classify(template_ious(blob.soft), min_score, margin)
        found.append(
            Detection(kind, _PALETTE_NAMES[blob.label - 1], (x0, y0, x1, y1), centroid, len(xs), score)
        )
    return sorted(found, key=lambda d: -d.score)


def by_class(detections: list[Detection]) -> dict[str | None, list[Detection]]:
    """Group detections by class (``None``: objects of no kind), most confident first, at most
    ``MAX_PER_CLASS`` each."""
    grouped: dict[str | None, list[Detection]] = defaultdict(list)
    for det in sorted(detections, key=lambda d: -d.score):
        if len(grouped[det.cls]) < MAX_PER_CLASS:
            grouped[det.cls].append(det)
    return dict(grouped)


