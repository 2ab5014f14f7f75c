"""GenEval's decision rules on synthetic detections, against hand-computed answers."""
import numpy as np
import pytest

from opd.rewards.geneval_rules import (
    Detection,
    box_iou,
    colour_queries,
    confidence_threshold,
    partial_score,
    relative_position,
    select_objects,
    strict_correct,
)


def det(label, score=0.95, box=(0, 0, 10, 10), color=None):
    return Detection(label, score, box, color=color)


def at(x, y, size=10):
    """A ``size`` px square box with its top-left corner at (x, y)."""
    return (x, y, x + size, y + size)


# --------------------------------------------------------------------------- geometry


def test_relative_position_hand_computed():
    # centres 10 px apart on x, summed widths 20: offset shrinks by 0.1·20 = 2 → 8/10 = 0.8 > 0.5
    assert relative_position(at(10, 0), at(0, 0)) == {"right of"}
    assert relative_position(at(0, 0), at(10, 0)) == {"left of"}
    assert relative_position(at(0, 0), at(0, 10)) == {"above"}  # image y points down
    assert relative_position(at(0, 10), at(0, 0)) == {"below"}
    # 2.5 px apart: 2.5 − 2 = 0.5 → 0.5/2.5 = 0.2, not a relation (but not "overlapping" either)
    assert relative_position((2.5, 0, 12.5, 10), at(0, 0)) == set()
    # 2 px apart: shrunk to 0 → overlap → no relation
    assert relative_position((2, 0, 12, 10), at(0, 0)) == set()
    # diagonal (10, 10): shrunk (8, 8) / |(10, 10)| = 0.566 on both axes → two relations
    assert relative_position(at(10, 10), at(0, 0)) == {"right of", "below"}
    # mostly horizontal (30, 5): x 28/30.4 = 0.92; y 3/30.4 = 0.10 → only "right of"
    assert relative_position(at(30, 5), at(0, 0)) == {"right of"}
    # a wider margin swallows the 10 px offset: 10 − 0.5·20 = 0
    assert relative_position(at(10, 0), at(0, 0), margin=0.5) == set()


def test_box_iou_uses_inclusive_pixels():
    # (0..9) and (5..14) on x, both 10 px tall: intersection 5·10 = 50, union 100 + 100 − 50
    assert box_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 9, 9), (20, 20, 29, 29)) == 0.0


# --------------------------------------------------------------------------- which detections count


def test_select_objects_threshold_order_cap_and_nms():
    dets = [det("cat", 0.3), det("cat", 0.31), det("cat", 0.9), det("dog", 0.2)]
    kept = select_objects(dets, threshold=0.3)
    assert [d.score for d in kept["cat"]] == [0.9, 0.31]  # strictly above 0.3, most confident first
    assert "dog" not in kept
    many = [det("cup", 0.4 + i / 100) for i in range(20)]
    assert len(select_objects(many, threshold=0.3)["cup"]) == 16  # GenEval keeps at most 16 per class
    overlapping = [det("cup", 0.9, (0, 0, 9, 9)), det("cup", 0.8, (1, 0, 10, 9)), det("cup", 0.7, (50, 50, 59, 59))]
    assert len(select_objects(overlapping, threshold=0.3)["cup"]) == 3  # NMS 1.0 = off (GenEval's default)
    assert [d.score for d in select_objects(overlapping, threshold=0.3, nms_threshold=0.5)["cup"]] == [0.9, 0.7]


def test_threshold_is_compared_in_float32_as_the_reference():
    # float32(0.3) = 10066330 · 2^-25 = 0.300000011920928955078125: above 0.3 in float64, equal in float32
    at_boundary = 10066330 * 2.0**-25
    assert at_boundary == float(np.float32(0.3)) and at_boundary > 0.3
    assert select_objects([det("cat", at_boundary)], threshold=0.3) == {}
    assert select_objects([det("cat", 0.3 + 1e-10)], threshold=0.3) == {}  # rounds to float32(0.3) as well
    above = (10066330 + 1) * 2.0**-25  # the next float32
    assert [d.score for d in select_objects([det("cat", above)], threshold=0.3)["cat"]] == [above]
    # counting: float32(0.9) = 15099494 · 2^-24 ≈ 0.8999999762 < 0.9, and 0.9 + 1e-10 rounds down to it
    assert select_objects([det("cup", 0.9 + 1e-10)], threshold=0.9) == {}
    assert len(select_objects([det("cup", 15099495 * 2.0**-24)], threshold=0.9)["cup"]) == 1


def test_equal_scores_keep_the_reference_argsort_order():
    a, b, c = det("car", 0.5, color="red"), det("car", 0.9), det("car", 0.5, color="blue")
    # np.argsort([0.5, 0.9, 0.5]) = [0, 2, 1], reversed [1, 2, 0]: of the equal scores the later first
    assert select_objects([a, b, c], threshold=0.3)["car"] == [b, c, a]
    assert select_objects([a, c], threshold=0.3)["car"] == [c, a]
    # 0.7 and 0.7 + 1e-10 differ in float64 but are the same float32: a tie, so the later comes first
    d, e = det("cup", 0.7 + 1e-10), det("cup", 0.7)
    assert select_objects([d, e], threshold=0.3)["cup"] == [e, d]
    # so a red and a blue car of equal confidence: GenEval colours the later one (blue) and fails
    assert not strict_correct(objects(a, c), RED_CAR)
    assert strict_correct(objects(c, a), RED_CAR)


def test_order_is_the_reference_expression_on_many_ties():
    """``np.argsort(float32 scores)[::-1]``, thresholded, capped at 16: the reference's own lines."""
    rng = np.random.default_rng(0)
    for n in (4, 5, 9, 17, 25):
        for _ in range(20):
            scores = rng.choice(np.float32([0.2, 0.3, 0.5, 0.8]), n)
            dets = [det("cat", float(sc)) for sc in scores]
            ref = np.argsort(scores)[::-1]
            ref = ref[scores[ref] > 0.3][:16].tolist()
            assert select_objects(dets, threshold=0.3).get("cat", []) == [dets[i] for i in ref]


def test_counting_prompts_use_the_stricter_threshold():
    assert confidence_threshold({"tag": "counting"}) == 0.9
    assert confidence_threshold({"tag": "two_object"}) == 0.3


# --------------------------------------------------------------------------- strict correctness

SINGLE = {"tag": "single_object", "include": [{"class": "cat", "count": 1}]}
TWO = {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]}
COUNT2 = {"tag": "counting", "include": [{"class": "cup", "count": 2}], "exclude": [{"class": "cup", "count": 3}]}
RED_CAR = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
CAR_LEFT_OF_DOG = {"tag": "position", "include": [{"class": "dog", "count": 1},
                                                  {"class": "car", "count": 1, "position": ["left of", 0]}]}
ATTR = {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"},
                                         {"class": "bus", "count": 1, "color": "blue"}]}


def objects(*dets):
    return select_objects(dets, threshold=0.3)


def test_strict_presence_and_counting():
    assert strict_correct(objects(det("cat")), SINGLE)
    assert not strict_correct(objects(det("dog")), SINGLE)
    assert strict_correct(objects(det("cat"), det("cat"), det("dog")), TWO)  # extra objects pass ("at least")
    assert strict_correct(objects(det("cup"), det("cup")), COUNT2)
    assert not strict_correct(objects(det("cup")), COUNT2)
    assert not strict_correct(objects(det("cup"), det("cup"), det("cup")), COUNT2)  # the exclude clause


def test_strict_colour_reads_only_the_most_confident_objects():
    assert strict_correct(objects(det("car", color="red")), RED_CAR)
    assert not strict_correct(objects(det("car", color="blue")), RED_CAR)
    # a red car exists, but the most confident car is blue: GenEval checks the top `count` only
    assert not strict_correct(objects(det("car", 0.9, color="blue"), det("car", 0.8, color="red")), RED_CAR)
    assert strict_correct(objects(det("car", color="red"), det("bus", color="blue")), ATTR)
    assert not strict_correct(objects(det("car", color="blue"), det("bus", color="red")), ATTR)  # swapped


def test_strict_position():
    assert strict_correct(objects(det("dog", box=at(50, 0)), det("car", box=at(0, 0))), CAR_LEFT_OF_DOG)
    assert not strict_correct(objects(det("dog", box=at(0, 0)), det("car", box=at(50, 0))), CAR_LEFT_OF_DOG)
    assert not strict_correct(objects(det("car", box=at(0, 0))), CAR_LEFT_OF_DOG)  # no target matched


def test_colour_must_be_classified_first():
    with pytest.raises(ValueError, match="no colour"):
        strict_correct(objects(det("car")), RED_CAR)
    assert colour_queries(objects(det("car"), det("bus")), ATTR) == [("car", 1), ("bus", 1)]
    assert colour_queries(objects(det("bus")), ATTR) == [("bus", 1)]  # no car: nothing to classify


# --------------------------------------------------------------------------- Flow-GRPO's partial score


def test_partial_score_worked_examples():
    assert partial_score(objects(det("cat")), SINGLE) == 1.0
    assert partial_score(objects(det("cup"), det("cup"), det("cup")), COUNT2) == pytest.approx(0.5)  # 1 − 1/2
    assert partial_score(objects(det("cat"), det("cat"), det("cat")), SINGLE) == pytest.approx(-1.0)  # 1 − 2/1
    # wrong count → the colour it asks scores 0: [0, 0]
    assert partial_score(objects(), RED_CAR) == 0.0
    # colour_attr: car red ✓ [1, 1]; bus found, wrong colour [1, 0] → 3/4
    assert partial_score(objects(det("car", color="red"), det("bus", color="green")), ATTR) == pytest.approx(0.75)
    # position: dog [1]; car found [1], relation fails [0] → 2/3; the reference's quirk adds a 1 → 3/4
    wrong = objects(det("dog", box=at(0, 0)), det("car", box=at(50, 0)))
    assert partial_score(wrong, CAR_LEFT_OF_DOG) == pytest.approx(2 / 3)
    assert partial_score(wrong, CAR_LEFT_OF_DOG, reference_quirk=True) == pytest.approx(3 / 4)
    right = objects(det("dog", box=at(50, 0)), det("car", box=at(0, 0)))
    assert partial_score(right, CAR_LEFT_OF_DOG) == partial_score(right, CAR_LEFT_OF_DOG, reference_quirk=True) == 1
    # exclude is ignored by the partial score; strict correctness is not
    three = objects(det("cup"), det("cup"))
    assert partial_score(three, COUNT2) == 1.0 and strict_correct(three, COUNT2)


RED_CAR_LEFT_OF_DOG = {"tag": "position", "include": [
    {"class": "dog", "count": 1}, {"class": "car", "count": 1, "color": "red", "position": ["left of", 0]}]}


def test_reference_quirk_reproduces_the_reference_lists():
    """Sub-score lists as Flow-GRPO's ``evaluate_reward`` builds them, against ours."""
    # the referent (dog) is missing: dog [0]; car [1] and the position [0] — the reference adds no 1 here
    lone_car = objects(det("car", box=at(0, 0)))
    assert partial_score(lone_car, CAR_LEFT_OF_DOG) == pytest.approx(1 / 3)  # [0, 1, 0]
    assert partial_score(lone_car, CAR_LEFT_OF_DOG, reference_quirk=True) == pytest.approx(1 / 3)  # [0, 1, 0]
    # two cars where one red car is asked, left of the dog: count 1 − 1/1 = 0, then
    # ours a 0 for the colour and one for the position, the reference a single 0 for both
    two_cars = objects(det("dog", box=at(50, 0)), det("car", box=at(0, 0), color="red"),
                       det("car", box=at(0, 30), color="red"))
    assert partial_score(two_cars, RED_CAR_LEFT_OF_DOG) == pytest.approx(1 / 4)  # [1, 0, 0, 0]
    assert partial_score(two_cars, RED_CAR_LEFT_OF_DOG, reference_quirk=True) == pytest.approx(1 / 3)  # [1, 0, 0]
    # the car is left of the dog but blue: colour 0, then ours a 0 for the position, the reference nothing
    blue = objects(det("dog", box=at(50, 0)), det("car", box=at(0, 0), color="blue"))
    assert partial_score(blue, RED_CAR_LEFT_OF_DOG) == pytest.approx(2 / 4)  # [1, 1, 0, 0]
    assert partial_score(blue, RED_CAR_LEFT_OF_DOG, reference_quirk=True) == pytest.approx(2 / 3)  # [1, 1, 0]
    # red but right of the dog: the relation check ran and failed, the reference appends 0 then 1
    wrong_side = objects(det("dog", box=at(0, 0)), det("car", box=at(50, 0), color="red"))
    assert partial_score(wrong_side, RED_CAR_LEFT_OF_DOG) == pytest.approx(3 / 4)  # [1, 1, 1, 0]
    assert partial_score(wrong_side, RED_CAR_LEFT_OF_DOG, reference_quirk=True) == pytest.approx(4 / 5)  # [1, 1, 1, 0, 1]
    right = objects(det("dog", box=at(50, 0)), det("car", box=at(0, 0), color="red"))
    assert partial_score(right, RED_CAR_LEFT_OF_DOG) == partial_score(right, RED_CAR_LEFT_OF_DOG,
                                                                      reference_quirk=True) == 1  # [1, 1, 1, 1]
