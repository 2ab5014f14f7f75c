"""GenEval's prompt set, regenerated: counts per tag, schema, determinism, grammar, shipped file."""
import json
from collections import Counter

import pytest

from conftest import ROOT
from opd.data.geneval_prompts import (
    COCO_CLASSES,
    COLORS,
    TAG_COUNTS,
    geneval_prompts,
    main,
    plural,
    with_article,
)

SHIPPED = ROOT / "data/geneval/evaluation_metadata.jsonl"


@pytest.fixture(scope="module")
def rows():
    return geneval_prompts()


def test_counts_per_tag_are_genevals(rows):
    assert Counter(r["tag"] for r in rows) == {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94,
                                               "position": 100, "color_attr": 100}
    assert len(rows) == sum(TAG_COUNTS.values()) == 553
    assert len({r["prompt"] for r in rows}) == 553
    assert {r["include"][0]["class"] for r in rows if r["tag"] == "single_object"} == set(COCO_CLASSES)


def test_schema_is_genevals(rows):
    for r in rows:
        assert set(r) == ({"tag", "include", "prompt", "exclude"} if r["tag"] == "counting"
                          else {"tag", "include", "prompt"})
        for clause in r["include"]:
            assert clause["class"] in COCO_CLASSES and clause["count"] >= 1
            assert set(clause) <= {"class", "count", "color", "position"}
            assert clause.get("color", "red") in COLORS
        if r["tag"] == "counting":
            (inc,), (exc,) = r["include"], r["exclude"]
            assert 2 <= inc["count"] <= 4 and exc == {"class": inc["class"], "count": inc["count"] + 1}
        if r["tag"] == "position":
            target, mover = r["include"]
            assert mover["position"][1] == 0 and mover["position"][0] in ("left of", "right of", "above", "below")
            assert r["prompt"] == f"a photo of {with_article(mover['class'])} {mover['position'][0]} " \
                                  f"{with_article(target['class'])}"
        if r["tag"] in ("colors", "color_attr"):
            assert all(c["class"] != "person" for c in r["include"])  # GenEval asks no "[colour] person"
        if r["tag"] in ("two_object", "position", "color_attr"):
            assert r["include"][0]["class"] != r["include"][1]["class"]
        if r["tag"] == "color_attr":
            assert r["include"][0]["color"] != r["include"][1]["color"]


def test_templates_and_grammar(rows):
    by_tag = {}
    for r in rows:
        by_tag.setdefault(r["tag"], r)
    a, b = by_tag["color_attr"]["include"]
    assert by_tag["color_attr"]["prompt"] == f"a photo of {with_article(a['color'])} {a['class']} and " \
                                             f"{with_article(b['color'])} {b['class']}"
    assert with_article("orange") == "an orange" and with_article("umbrella") == "an umbrella"
    assert with_article("red car") == "a red car"
    assert [plural(n) for n in ("cat", "bench", "bus", "wine glass", "toothbrush", "skis", "scissors", "sheep",
                                "knife", "computer mouse", "person")] == \
        ["cats", "benches", "buses", "wine glasses", "toothbrushes", "skis", "scissors", "sheep", "knives",
         "computer mice", "people"]
    counting = [r for r in rows if r["tag"] == "counting"]
    numbers = {2: "two", 3: "three", 4: "four"}
    assert all(r["prompt"] == f"a photo of {numbers[r['include'][0]['count']]} {plural(r['include'][0]['class'])}"
               for r in counting)


def test_deterministic_and_seeded(rows):
    assert geneval_prompts() == rows
    assert geneval_prompts(seed=1) != rows


def test_shipped_file_is_the_generators_output(tmp_path):
    out = tmp_path / "meta.jsonl"
    main(["--out", str(out)])
    assert out.read_text() == SHIPPED.read_text()
    assert [json.loads(line) for line in SHIPPED.read_text().splitlines()] == geneval_prompts()
