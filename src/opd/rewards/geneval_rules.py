"""GenEval's decision rules on detections: no models here, so every rule is testable on boxes.

The rules follow GenEval's ``evaluation/evaluate_images.py`` (Ghosh et al., 2023) and, for the
training score, Flow-GRPO's ``reward_server/gen_eval.py``:

- **Which detections count** (:func:`select_objects`): per class, detections scoring strictly above
  the confidence threshold (0.3; 0.9 for prompts tagged ``counting``), most confident first, at most
  16 per class, then greedy NMS at IoU 1.0 (i.e. off, GenEval's default). Exactly as the reference
  computes it: the detector's scores are float32 and are compared with the threshold in float32 (a
  float32 array against a Python float), so a score that rounds to ``float32(0.3)`` is *not* above 0.3;
  the order is ``np.argsort(scores)[::-1]``, so equal scores are not kept in input order (for two or
  three equal scores the later detection comes first; beyond that numpy's default sort is not stable
  and its SIMD paths differ by CPU, so the reference's order is whatever that call gives there).
- **Relative position** (:func:`relative_position`): A relative to B from the box centres; the
  centre offset is shrunk by ``c = 0.1`` of the summed box sizes per axis (clipped at 0), then
  divided by the *unshrunk* offset's length; a component beyond ±0.5 names the relation
  (x < −0.5 "left of", x > 0.5 "right of", y < −0.5 "above", y > 0.5 "below"; image y points down).
- **Strict correctness** (:func:`strict_correct`, GenEval's metric): every ``include`` clause needs
  its ``count`` most confident objects (at least ``count``: more pass); a colour must hold for all
  of them; a position ``[relation, i]`` must hold between each of them and each object matched by
  clause ``i``, which must itself have matched. Any ``exclude`` clause with at least ``count``
  objects fails the prompt (this makes counting exact). The mini world's judge has a stricter
  rule of its own (:func:`opd.rewards.geneval_mini.exact_correct`: exact counts, nothing else in
  the image) and shares :func:`positions_hold` and :func:`excluded` with this one.
- **Partial score** (:func:`partial_score`, Flow-GRPO's training reward): the mean of per-clause
  sub-scores — count ``1 − |n − n_found| / n`` over *all* kept objects of the class (negative for
  far too many); a wrong count adds a 0 for each colour/position it asks; else colour
  ``1 − |n − n_colour| / n`` and position 1 on success, 0 on failure. ``exclude`` is ignored.
  ``reference_quirk=True`` reproduces the reference's sub-score lists exactly: one 0 (not one per
  sub-score) when the count is wrong and a colour or position is asked; for a position clause, an
  extra 1 after a relation check that ran over the objects (failure ``[0, 1]``), only ``[0]`` when
  the clause it refers to failed, and nothing when the clause's own colour failed.

Colours are GenEval's ten; :class:`Detection.color` must be filled (by a colour classifier) for
the objects :func:`colour_queries` lists before the two judges read it.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

import numpy as np

from opd.data.world.scene import POSITION_THRESHOLD, relations

#: GenEval's ten colour names (the zero-shot classes of its CLIP colour classifier)
COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
#: GenEval's defaults (``evaluate_images.py`` options)
THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
NMS_THRESHOLD = 1.0
# POSITION_THRESHOLD, GenEval's relation margin (0.1), comes with the relation test from opd.data.world.scene

Box = tuple[float, float, float, float]


@dataclass(frozen=True, eq=False)
class Detection:
    """One detected object: ``box`` = (x0, y0, x1, y1) in pixels; ``mask`` an optional ``[H, W]``
    bool array over the whole image; ``color`` one of :data:`COLORS` once classified."""

    label: str
    score: float
    box: Box
    mask: np.ndarray | None = field(default=None, repr=False)
    color: str | None = None


def confidence_threshold(meta: dict[str, Any], threshold: float = THRESHOLD,
                         counting_threshold: float = COUNTING_THRESHOLD) -> float:
    """GenEval's detection threshold for one prompt: stricter for the counting task."""
    return counting_threshold if meta.get("tag") == "counting" else threshold


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU with GenEval's inclusive-pixel convention (+1 on each side length)."""
    def area(box: Sequence[float]) -> float:
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inter = area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def select_objects(detections: Iterable[Detection], threshold: float, max_objects: int = MAX_OBJECTS,
                   nms_threshold: float = NMS_THRESHOLD) -> dict[str, list[Detection]]:
    """Class → kept detections, most confident first (threshold, per-class cap, then NMS), in the
    reference's float32 arithmetic and argsort order (see the module docstring). ``detections`` in the
    detector's output order, which decides ties."""
    by_label: dict[str, list[Detection]] = defaultdict(list)
    for det in detections:
        by_label[det.label].append(det)
    kept: dict[str, list[Detection]] = {}
    for label, dets in by_label.items():
        scores = np.asarray([d.score for d in dets], dtype=np.float32)
        order = np.argsort(scores)[::-1]
        order = order[scores[order] > np.float32(threshold)][:max_objects].tolist()
        chosen: list[Detection] = []
        while order:
            best = dets[order.pop(0)]
            chosen.append(best)
            if nms_threshold < 1:
                order = [i for i in order if box_iou(best.box, dets[i].box) < nms_threshold]
        if chosen:
            kept[label] = chosen
    return kept


def relative_position(box_a: Sequence[float], box_b: Sequence[float],
                      margin: float = POSITION_THRESHOLD) -> set[str]:
    """Relations of A to B (``{"left of", "above"}``, …; empty when they overlap too much): GenEval's
    rule, implemented once in :func:`opd.data.world.scene.relations` (boxes given corner-first)."""
    def ordered(box: Sequence[float]) -> tuple[float, float, float, float]:
        return (min(box[0], box[2]), min(box[1], box[3]), max(box[0], box[2]), max(box[1], box[3]))

    return relations(ordered(box_a), ordered(box_b), margin)


def colour_queries(objects: dict[str, list[Detection]], meta: dict[str, Any]) -> list[tuple[str, int]]:
    """``(class, n)`` pairs whose ``n`` most confident objects need a colour before judging."""
    return [(c["class"], c["count"]) for c in meta["include"]
            if "color" in c and len(objects.get(c["class"], [])) >= c["count"]]


def _colour(det: Detection) -> str:
    if det.color is None:
        raise ValueError(f"detection of {det.label!r} has no colour: classify the objects colour_queries() lists")
    return det.color


def positions_hold(found: Iterable[Any], relation: str, targets: Sequence[Any], margin: float = POSITION_THRESHOLD,
                   box: Callable[[Any], Sequence[float]] = attrgetter("box")) -> bool:
    """Whether ``relation`` (``"left of"``, …) holds between every object of ``found`` and every one
    of ``targets`` under :func:`relative_position`; ``box(det)`` reads a detection's box (this
    module's :class:`Detection` by default; the mini world's detections pass ``attrgetter("bbox")``)."""
    return all(relation in relative_position(box(obj), box(ref), margin) for obj in found for ref in targets)


def excluded(objects: dict[Any, list[Any]], meta: dict[str, Any]) -> bool:
    """Whether an ``exclude`` clause of ``meta`` has at least its ``count`` objects in ``objects``
    (class → detections): such an image fails every strict rule."""
    return any(len(objects.get(c["class"], [])) >= c["count"] for c in meta.get("exclude", []))


def strict_correct(objects: dict[str, list[Detection]], meta: dict[str, Any],
                   margin: float = POSITION_THRESHOLD) -> bool:
    """GenEval's binary correctness of one image: at least ``count`` objects per clause, the most
    confident ``count`` of them checked, other objects ignored (see the module docstring)."""
    correct, groups = True, []
    for clause in meta["include"]:
        n = clause["count"]
        found = objects.get(clause["class"], [])[:n]
        ok = len(found) >= n
        if ok and "color" in clause:
            ok = sum(_colour(d) == clause["color"] for d in found) >= n
        if ok and "position" in clause:
            relation, target = clause["position"]
            ok = groups[target] is not None and positions_hold(found, relation, groups[target], margin)
        groups.append(found if ok else None)
        correct = correct and ok
    return correct and not excluded(objects, meta)


def partial_score(objects: dict[str, list[Detection]], meta: dict[str, Any], margin: float = POSITION_THRESHOLD,
                  reference_quirk: bool = False) -> float:
    """Flow-GRPO's partial GenEval reward of one image (see the module docstring)."""
    return partial_score_with(objects, meta, _colour,
                              lambda found, relation, targets: positions_hold(found, relation, targets, margin),
                              reference_quirk)


def partial_score_with(objects: dict[str, list[Any]], meta: dict[str, Any], colour_of: Callable[[Any], str],
                       position_holds: Callable[[list[Any], str, list[Any]], bool],
                       reference_quirk: bool = False) -> float:
    """The partial score over any detection type: ``colour_of(det)`` reads a detection's colour and
    ``position_holds(found, relation, targets)`` tests a relation, so this judge and the mini world's
    (:mod:`opd.rewards.geneval_mini`) share one implementation of the rule.

    Per clause: count ``1 − |n − n_found| / n``; a wrong count scores 0 for each colour/position the
    clause asks; else colour ``1 − |n − n_colour| / n``, and the position 1 or 0 (0 also when the
    colour or the clause it refers to failed). ``reference_quirk`` gives the reference's lists instead
    (see the module docstring).
    """
    scores: list[float] = []
    groups: list[list[Any] | None] = []
    for clause in meta["include"]:
        n, found = clause["count"], objects.get(clause["class"], [])
        asks = ("color" in clause) + ("position" in clause)
        scores.append(1 - abs(n - len(found)) / n)
        matched = len(found) == n
        if not matched:
            scores.extend([0.0] * (min(asks, 1) if reference_quirk else asks))
        if matched and "color" in clause:
            num_colour = sum(colour_of(d) == clause["color"] for d in found)
            scores.append(1 - abs(n - num_colour) / n)
            matched = num_colour == n
        if "position" in clause and len(found) == n:
            relation, target = clause["position"]
            referent = groups[target]
            ok = matched and referent is not None and position_holds(found, relation, referent)
            if not reference_quirk:
                scores.append(float(ok))
            elif matched:  # the reference skips the position when the colour failed
                scores.extend([1.0] if ok else ([0.0] if referent is None else [0.0, 1.0]))
            matched = ok
        groups.append(found if matched else None)
    return sum(scores) / len(scores) if scores else 0.0
