"""A prompt-conditioned aesthetic score for the mini world: caption adherence × composition quality.

What it models. The paper's aesthetic reward (PickScore + CLIPScore + HPSv2.1) is a learned human
preference *for an image given its prompt*: a picture that ignores the caption scores low however
pretty, and among pictures that show the caption the better composed one wins. The mini world's
pictures are flat shapes in a fixed palette, so both halves can be measured exactly instead of
learned: adherence checks every fact the caption states with the GenEval-mini detector
(:func:`opd.rewards.shapes.detect`), and quality scores the layout with hand-crafted
photo-quality features in the tradition of Datta et al. (2006, "Studying aesthetics in
photographic images using a computational approach", ECCV: size of the subject, rule of thirds /
placement, brightness contrast), Ke, Tang & Jing (2006, "The design of high-level features for
photo quality assessment", CVPR: simplicity — one uncluttered subject on a clean background —,
spatial distribution of edges, contrast) and the visual-balance rule of design (the visual weight of
a picture, area-weighted, centred; Datta's and Ke's placement features are its photographic cousins).
Colourfulness (Hasler & Süsstrunk 2003), the previous stand-in's main term, is no longer a term: the
caption fixes the colours, and rewarding saturation for its own sake was the hack this replaces.

The formula (``reward`` in [0, 1], one image against one metadata row)::

    reward = A · Q
    A = ρ ** E                                   ρ = 0.25 (violation_factor)
    Q = q0 + (1 − q0) · C                        q0 = 0.3 (quality_floor)
    C = (balance + spacing + scale + clean + contrast) / 5

so one violated fact costs a factor 4 and a correct render with the worst composition (Q = q0 = 0.3)
still beats any render with a whole violated fact (E ≥ 1: A·Q ≤ ρ = 0.25). ``E`` counts the
caption's violated facts:

- objects: the caption's clauses ``{"class"?, "color"?, "count": n}`` give ``n`` slots each; the
  detections are assigned to slots (each at most once; by dynamic programming) to minimise the sum
  of the object errors below (missing + extra + kind + colour + scale), and then
  ``missing`` = empty slots, ``extra`` = unassigned detections (unrequested objects, including blobs
  of no clear kind), ``kind`` = assigned detections of the wrong kind (a blob of no clear kind, or an
  object wider or taller than ``MAX_OBJECT_FRAC`` = 0.75 of the canvas, is the wrong kind for every
  clause), ``colour`` = assigned detections of the wrong colour; each counts 1.
- scale (rows with ``"scale"``): per assigned object of side ``s`` (its bbox's longer side, in 64-px
  canvas units), ``small``: ``clip((s − 16) / 8, 0, 1)``; ``large``: ``clip((28 − s) / 8, 0, 1)``
  (tolerant of ``opd.data.world.layout.SCALE_RANGE``: small objects are drawn at 12-14 px, large
  ones at 30-38 px).
- distinct colours (``"distinct_colors": true``): assigned objects − distinct colours among them.
- row (``"layout": "row"``): assigned objects whose bbox centre lies more than half the mean object
  height above or below the median centre (with at least two assigned objects).
- background: ``(1 − b) / β``, β = 0.1 (background_tolerance), with ``b`` the share of the pixels
  outside every detection's box (grown by ``BOX_MARGIN`` = 2 px) whose *colour name* is the named
  background: 10 % stray pixels count as one violated fact. A pixel's colour name is the nearest
  world colour (``BACKGROUNDS`` and ``OBJECT_COLORS``) of the 3 × 3 box-filtered image, or none
  beyond ``MAX_COLOR_DIST`` = 80 RGB units (0-255); the filter keeps pixel noise from flipping
  near colours (black and navy are 61 apart).

The quality terms, each in [0, 1] and 0 for all when no shape (a detection with a kind) is found, are
computed once per image over its *shape* detections (boxes and areas in pixels of the ``H × W`` image):

- ``balance`` (visual balance): ``clip(1 − δ², 0, 1)``, ``δ`` = distance of the area-weighted mean
  centroid from the canvas centre, per axis in units of the half side (0 centred, 1 at the middle
  of an edge; a subject on a rule-of-thirds point has δ ≈ 0.47, balance 0.78).
- ``spacing`` (breathing room, Ke's simplicity): mean over shapes of ``min(1, g / (τ · s))`` with
  ``g`` the smallest gap (px) from the shape's box to the canvas edge or to any other detection's
  box (0 when touching or overlapping), ``s`` its box's longer side, τ = 0.25.
- ``scale`` (subject size, Datta): extent ``e = sqrt(Σ s² / (H · W))``; 1 inside the band
  ``[0.25, 0.55]`` (``small``: ``[0.12, 0.25]``, ``large``: ``[0.45, 0.65]``), falling as
  ``1 − |log2(e / nearest band end)|`` outside it (0 at half or twice the band).
- ``clean`` (simplicity, edge definition): ``u · k``; ``u`` = share of the image's non-background
  pixels (those whose colour name is not the image's dominant background, the background name
  with the largest ``b``) that lie in a shape's box grown by ``BOX_MARGIN``, and ``k`` =
  area-weighted mean over shapes of ``clip((iou − 0.75) / 0.15, 0, 1)``, ``iou`` the detector's
  template confidence (0.75 is the least IoU at which the detector names a kind).
- ``contrast`` (figure-ground contrast, Datta / Ke): area-weighted mean over shapes of
  ``min(1, ‖μ − μ_bg‖ / 100)``, ``μ`` the mean RGB (0-255) of the pixels in the shape's box whose
  unfiltered nearest world colour is the shape's colour, and ``μ_bg`` the mean RGB of the pixels
  named the dominant background (every object colour is at least 110 from every background, so
  clean renders score 1; faded or muddy objects score less).

Colour harmony (e.g. hue templates, Cohen-Or et al. 2006) is left out: the caption fixes the hues.

``score`` returns ``{"reward", "adherence": A, "errors": E, "quality": Q, "balance", "spacing",
"scale", "clean", "contrast"}``, each ``float32 [B]`` on CPU; metadata rows must be aesthetic rows
(``objects`` and ``background``, see ``opd.data.world.grammar``). :meth:`AestheticMini.score_matrix`
scores every image against every row, analysing each image once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from opd.data.world.scene import BACKGROUNDS, CANVAS, OBJECT_COLORS, SHAPE_KINDS
from opd.rewards.base import Reward, check_batch, to_uint8_hwc
from opd.rewards.shapes import Detection, detect
from opd.rewards.workers import ImageWorkers

#: the world's colours: backgrounds first, then object colours
_WORLD_NAMES: tuple[str, ...] = tuple(BACKGROUNDS) + tuple(OBJECT_COLORS)
_WORLD = np.array([(BACKGROUNDS | OBJECT_COLORS)[n] for n in _WORLD_NAMES], dtype=np.float32)
_NUM_BG = len(BACKGROUNDS)
#: a pixel farther than this (RGB, 0-255) from every world colour has no colour name
MAX_COLOR_DIST = 80.0
#: detection boxes are grown by this many pixels before the background is measured around them
BOX_MARGIN = 2
#: a detection wider or taller than this share of the canvas is not "a shape on a background"
MAX_OBJECT_FRAC = 0.75

SPACING_TAU = 0.25
SCALE_BANDS: dict[str | None, tuple[float, float]] = {None: (0.25, 0.55), "small": (0.12, 0.25), "large": (0.45, 0.65)}
#: scale facts of the caption, in 64-px canvas units: (side that is fine, side that is fully wrong)
SCALE_FACTS: dict[str, tuple[float, float]] = {"small": (16.0, 24.0), "large": (28.0, 20.0)}
#: template IoU mapped linearly to confidence 0..1 (0.75 is the detector's least IoU for a kind)
CONFIDENCE_RANGE = (0.75, 0.9)
CONTRAST_SCALE = 100.0
QUALITY_TERMS: tuple[str, ...] = ("balance", "spacing", "scale", "clean", "contrast")
KEYS: tuple[str, ...] = ("reward", "adherence", "errors", "quality", *QUALITY_TERMS)


@dataclass(frozen=True)
class Analysis:
    """What the reward needs of one image, whatever the caption (computed once per image)."""

    height: int
    width: int
    detections: tuple[Detection, ...]
    background_share: dict[str, float]  # per background name: share of the non-object pixels
    terms: dict[str, float]  # quality terms except scale
    extent: float  # sqrt(sum of squared box sides / image area), over shape detections


def _clip01(x: float) -> float:
    return min(1.0, max(0.0, x))


def _side(det: Detection) -> int:
    x0, y0, x1, y1 = det.bbox
    return max(x1 - x0, y1 - y0)


def _is_shape(det: Detection, height: int, width: int) -> bool:
    """A detection of a clear kind that is not outsized (see the module docstring)."""
    x0, y0, x1, y1 = det.bbox
    return (
        det.cls is not None
        and x1 - x0 <= MAX_OBJECT_FRAC * width
        and y1 - y0 <= MAX_OBJECT_FRAC * height
    )


def _box_gap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Chebyshev gap between two pixel boxes (0 when they touch or overlap)."""
    gx = max(b[0] - a[2], a[0] - b[2])
    gy = max(b[1] - a[3], a[1] - b[3])
    return float(max(0, gx, gy))


def analyse(image: np.ndarray, detections: list[Detection] | None = None) -> Analysis:
    """Detect and measure one ``[H, W, 3]`` uint8 image (module docstring: the quality terms)."""
    h, w = image.shape[:2]
    dets = tuple(detect(image) if detections is None else detections)
    pixels = image.astype(np.float32)
    # colour names of the 3 x 3 box-filtered image: the background is a regional property, and
    # averaging keeps pixel noise from flipping near colours (black and navy are 61 apart)
    padded = np.pad(pixels, ((1, 1), (1, 1), (0, 0)), mode="edge")
    smooth = sum(padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)) / 9
    dist = np.linalg.norm(smooth[:, :, None, :] - _WORLD, axis=-1)  # [H, W, 12]
    labels = np.where(dist.min(-1) <= MAX_COLOR_DIST, dist.argmin(-1), -1)

    def grown(boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
        mask = np.zeros((h, w), dtype=bool)
        for x0, y0, x1, y1 in boxes:
            mask[max(0, y0 - BOX_MARGIN) : y1 + BOX_MARGIN, max(0, x0 - BOX_MARGIN) : x1 + BOX_MARGIN] = True
        return mask

    outside = ~grown([d.bbox for d in dets])
    num_outside = int(outside.sum())
    share = {
        name: float((labels[outside] == k).sum()) / num_outside if num_outside else 0.0
        for k, name in enumerate(BACKGROUNDS)
    }
    shapes = [d for d in dets if _is_shape(d, h, w)]
    terms = dict.fromkeys(("balance", "spacing", "clean", "contrast"), 0.0)
    extent = 0.0
    if shapes:
        areas = np.array([d.area for d in shapes], dtype=np.float64)
        weights = areas / areas.sum()
        # balance: area-weighted centroid, per axis in half-sides from the centre
        cx = float(np.dot(weights, [d.centroid[0] for d in shapes]))
        cy = float(np.dot(weights, [d.centroid[1] for d in shapes]))
        delta2 = ((cx - w / 2) / (w / 2)) ** 2 + ((cy - h / 2) / (h / 2)) ** 2
        terms["balance"] = _clip01(1 - delta2)
        # spacing: smallest gap to the canvas edge or any other detection, in units of tau * side
        room = []
        for det in shapes:
            x0, y0, x1, y1 = det.bbox
            gap = float(min(x0, y0, w - x1, h - y1))
            for other in dets:
                if other is not det:
                    gap = min(gap, _box_gap(det.bbox, other.bbox))
            room.append(min(1.0, gap / (SPACING_TAU * _side(det))))
        terms["spacing"] = float(np.mean(room))
        extent = math.sqrt(sum(_side(d) ** 2 for d in shapes) / (h * w))
        # clean: non-background pixels explained by the shapes' boxes, times template confidence
        dominant = max(range(_NUM_BG), key=lambda k: share[_WORLD_NAMES[k]])
        non_background = labels != dominant
        explained = non_background & grown([d.bbox for d in shapes])
        explained_share = float(explained.sum()) / max(1, int(non_background.sum()))
        lo, hi = CONFIDENCE_RANGE
        confidence = float(np.dot(weights, [_clip01((d.score - lo) / (hi - lo)) for d in shapes]))
        terms["clean"] = explained_share * confidence
        # contrast: each shape's own-colour pixels against the dominant background's pixels
        bg_pixels = pixels[labels == dominant]
        bg_mean = bg_pixels.mean(0) if len(bg_pixels) else np.median(pixels.reshape(-1, 3), axis=0)
        raw = np.linalg.norm(pixels[:, :, None, :] - _WORLD, axis=-1).argmin(-1)  # unsmoothed colour names
        contrast = []
        for det in shapes:
            x0, y0, x1, y1 = det.bbox
            own = raw[y0:y1, x0:x1] == _WORLD_NAMES.index(det.color)
            mean = pixels[y0:y1, x0:x1][own].mean(0) if own.any() else pixels[y0:y1, x0:x1].reshape(-1, 3).mean(0)
            contrast.append(min(1.0, float(np.linalg.norm(mean - bg_mean)) / CONTRAST_SCALE))
        terms["contrast"] = float(np.dot(weights, contrast))
    return Analysis(h, w, dets, share, terms, extent)


def scale_term(extent: float, scale: str | None) -> float:
    """1 inside the band of ``scale``, ``1 − |log2(e / band end)|`` outside (0 for no shapes)."""
    if extent <= 0:
        return 0.0
    lo, hi = SCALE_BANDS[scale]
    if extent < lo:
        return _clip01(1 - math.log2(lo / extent))
    if extent > hi:
        return _clip01(1 - math.log2(extent / hi))
    return 1.0


def _min_cost_assignment(costs: list[list[float]], counts: list[int], num_dets: int) -> tuple[float, list[int]]:
    """Assign detections to clauses, clause ``c`` taking at most ``counts[c]`` of them, minimising
    ``Σ costs[c][d]`` over assigned pairs + 1 per empty slot + 1 per unassigned detection.
    Returns (the minimum, the clause of each detection or -1).

    Dynamic programme over the detections and the number of slots filled per clause (mixed-radix
    states, ``Π (count + 1)`` of them: 8 for a caption of three single objects)."""
    radix = [1]
    for n in counts:
        radix.append(radix[-1] * (n + 1))
    num_states = radix[-1]
    best = [math.inf] * num_states
    best[0] = 0.0
    took: list[list[int]] = []  # per detection and resulting state: the clause it joined (-1: none)
    for d in range(num_dets):
        new = [cost + 1.0 for cost in best]  # detection d unassigned: an unrequested object
        choice = [-1] * num_states
        for state, base in enumerate(best):
            if base == math.inf:
                continue
            for c, n in enumerate(counts):
                if (state // radix[c]) % (n + 1) < n and base + costs[c][d] < new[state + radix[c]]:
                    new[state + radix[c]], choice[state + radix[c]] = base + costs[c][d], c
        took.append(choice)
        best = new
    filled = [sum((state // radix[c]) % (n + 1) for c, n in enumerate(counts)) for state in range(num_states)]
    totals = [cost + sum(counts) - f for cost, f in zip(best, filled, strict=True)]
    state = min(range(num_states), key=totals.__getitem__)
    total, clause_of = totals[state], [-1] * num_dets
    for d in range(num_dets - 1, -1, -1):
        clause_of[d] = took[d][state]
        if clause_of[d] >= 0:
            state -= radix[clause_of[d]]
    return total, clause_of


def adherence_errors(analysis: Analysis, meta: dict[str, Any], background_tolerance: float = 0.1) -> float:
    """``E``, the number of caption facts ``analysis`` violates (module docstring)."""
    h, w = analysis.height, analysis.width
    dets = analysis.detections
    clauses = meta["objects"]
    scale = meta.get("scale")
    to_canvas = CANVAS / max(h, w)

    def scale_error(det: Detection) -> float:
        if scale is None:
            return 0.0
        fine, wrong = SCALE_FACTS[scale]
        return _clip01((_side(det) * to_canvas - fine) / (wrong - fine))

    costs = []
    for clause in clauses:
        row = []
        for det in dets:
            kind_wrong = not _is_shape(det, h, w) or ("class" in clause and det.cls != clause["class"])
            colour_wrong = "color" in clause and det.color != clause["color"]
            row.append(float(kind_wrong) + float(colour_wrong) + scale_error(det))
        costs.append(row)
    errors, clause_of = _min_cost_assignment(costs, [int(clause["count"]) for clause in clauses], len(dets))
    assigned = [det for det, c in zip(dets, clause_of, strict=True) if c >= 0]
    if meta.get("distinct_colors"):
        errors += len(assigned) - len({d.color for d in assigned})
    if meta.get("layout") == "row" and len(assigned) >= 2:
        centres = [(d.bbox[1] + d.bbox[3]) / 2 for d in assigned]
        heights = [d.bbox[3] - d.bbox[1] for d in assigned]
        middle, half = float(np.median(centres)), 0.5 * float(np.mean(heights))
        errors += sum(abs(c - middle) > half for c in centres)
    errors += (1 - analysis.background_share[meta["background"]]) / background_tolerance
    return float(errors)


def check_meta(meta: dict[str, Any], where: str) -> None:
    """Fail clearly on a row that is not an aesthetic row."""
    if not isinstance(meta, Mapping) or "objects" not in meta or "background" not in meta:
        keys = sorted(meta) if isinstance(meta, Mapping) else type(meta).__name__
        raise ValueError(
            f"AestheticMini: {where} lacks 'objects'/'background' (keys: {keys}); it needs aesthetic "
            "rows such as load_prompts('aesthetic', ...)"
        )
    if meta["background"] not in BACKGROUNDS:
        raise ValueError(f"AestheticMini: {where} has background={meta['background']!r}; expected one of {tuple(BACKGROUNDS)}")
    for clause in meta["objects"]:
        if clause.get("class", SHAPE_KINDS[0]) not in SHAPE_KINDS or clause.get("color", "red") not in OBJECT_COLORS:
            raise ValueError(f"AestheticMini: {where} has an unknown kind or colour in clause {clause}")
    if meta.get("scale") not in (None, *SCALE_FACTS):
        raise ValueError(f"AestheticMini: {where} has scale={meta['scale']!r}; expected 'small' or 'large'")


class AestheticMini(Reward):
    """Prompt-conditioned aesthetic score ``reward = A · Q`` (module docstring: the exact formula).

    ``violation_factor`` ρ: the factor each violated caption fact costs; ``quality_floor`` q0: the
    quality of a correct render with the worst composition (ρ < q0 keeps every correct render above
    every render with a violated fact); ``background_tolerance`` β: the share of stray background
    pixels that counts as one violated fact. ``num_workers`` > 1 analyses the images of a batch in
    that many processes (the same scores; :mod:`opd.rewards.workers`).
    """

    name = "aesthetic_mini"

    def __init__(
        self, violation_factor: float = 0.25, quality_floor: float = 0.3, background_tolerance: float = 0.1,
        num_workers: int = 1,
    ) -> None:
        if not 0 < violation_factor < quality_floor <= 1:
            raise ValueError(
                f"AestheticMini: need 0 < violation_factor ({violation_factor}) < quality_floor "
                f"({quality_floor}) <= 1, so that a correct plain render beats one with a violated fact"
            )
        if background_tolerance <= 0:
            raise ValueError(f"AestheticMini: background_tolerance={background_tolerance} must be positive")
        self.violation_factor = violation_factor
        self.quality_floor = quality_floor
        self.background_tolerance = background_tolerance
        self.workers = ImageWorkers(num_workers, "AestheticMini")

    def judge(self, analysis: Analysis, meta: dict[str, Any]) -> dict[str, float]:
        """Every key of :meth:`score` for one analysed image against one row."""
        errors = adherence_errors(analysis, meta, self.background_tolerance)
        adherence = self.violation_factor**errors
        terms = {**analysis.terms, "scale": scale_term(analysis.extent, meta.get("scale"))}
        composition = sum(terms[t] for t in QUALITY_TERMS) / len(QUALITY_TERMS)
        quality = self.quality_floor + (1 - self.quality_floor) * composition
        return {"reward": adherence * quality, "adherence": adherence, "errors": errors, "quality": quality, **terms}

    def analyse(self, images: Tensor) -> list[Analysis]:
        """One :class:`Analysis` per image of ``[N, 3, H, W]`` in [0, 1]."""
        return self.workers.map(analyse, to_uint8_hwc(images))

    def score(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> dict[str, Tensor]:
        """``images [B, 3, H, W]`` in [0, 1] against their rows → ``{key: float32 [B]}``."""
        check_batch(images, prompts, metadata)
        for i, meta in enumerate(metadata):
            check_meta(meta, f"metadata[{i}] (prompt {prompts[i]!r})")
        judged = [self.judge(a, m) for a, m in zip(self.analyse(images), metadata, strict=True)]
        return {key: torch.tensor([j[key] for j in judged], dtype=torch.float32) for key in KEYS}

    def score_matrix(self, images: Tensor, metadata: list[dict[str, Any]], batch_size: int = 64) -> dict[str, Tensor]:
        """Every image against every row: ``images [N, 3, H, W]``, ``M`` rows → ``{key: float32 [N, M]}``,
        ``[n, m]`` = what ``score`` gives image ``n`` under row ``m``. Each image is detected and
        measured once, then judged against every row (``batch_size``, the base class's batching of
        ``score`` calls, is not needed here and is ignored)."""
        check_batch(images, [""] * images.shape[0], [{}] * images.shape[0])
        for j, meta in enumerate(metadata):
            check_meta(meta, f"metadata[{j}] (prompt {meta.get('prompt') if isinstance(meta, Mapping) else None!r})")
        judged = [[self.judge(analysis, meta) for meta in metadata] for analysis in self.analyse(images)]
        return {
            key: torch.tensor([[j[key] for j in row] for row in judged], dtype=torch.float32).reshape(
                len(judged), len(metadata)
            )
            for key in KEYS
        }
