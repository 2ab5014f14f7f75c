"""The share of a teacher's gain a student keeps, and its paired prompt-bootstrap interval, against
hand-enumerated bootstrap distributions."""
from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest

from opd.evaluation.bootstrap import bootstrap_ci, resampled_means
from opd.results.gain_share import (
    PromptScores,
    main,
    projected_interval,
    prompt_scores,
    row_shares,
    share_interval,
)


def scores(groups, tags=None, name="m"):
    prompts = [f"p{i}" for i in range(len(groups))]
    return PromptScores(name, prompts, tags or ["t"] * len(groups), [list(g) for g in groups])


def test_resampled_means_pairs_models_on_the_same_prompt_draws():
    a, b = [[0.0], [1.0], [2.0]], [[10.0], [11.0], [12.0]]
    stats = resampled_means([a, b], num_resamples=200, seed=3)
    # b is a + 10 prompt by prompt: only a paired draw keeps the difference exactly 10 on every resample
    np.testing.assert_allclose(stats[1] - stats[0], 10.0)
    # one model: the resamples behind bootstrap_ci
    low, high = np.quantile(resampled_means([a], num_resamples=200, seed=3)[0], [0.025, 0.975])
    assert bootstrap_ci(a, num_resamples=200, seed=3) == pytest.approx((low, high))
    with pytest.raises(ValueError, match="different numbers of prompts"):
        resampled_means([a, b[:2]])


def test_share_interval_matches_the_enumerated_bootstrap_distribution():
    # two prompts; a resample draws (0,0), (1,1) with p 1/4 each and a mixed pair with p 1/2:
    # teacher means 1, 0.5, 0.75 over a base of 0, student always 0.5 -> shares 0.5, 1.0, 2/3
    share, low, high = share_interval(scores([[0.0], [0.0]]), scores([[1.0], [0.5]]), [scores([[0.5], [0.5]])],
                                      num_resamples=2000)
    assert share == pytest.approx(0.5 / 0.75)
    assert (low, high) == pytest.approx((0.5, 1.0))


def test_seeds_enter_as_their_mean():
    base, teacher = scores([[0.0], [0.2], [0.1]]), scores([[1.0], [0.6], [0.9]])
    one = share_interval(base, teacher, [scores([[0.5], [0.4], [0.6]])])
    two = share_interval(base, teacher, [scores([[0.2], [0.3], [0.7]]), scores([[0.8], [0.5], [0.5]])])
    assert one == pytest.approx(two)
    assert one[0] == pytest.approx((0.5 - 0.1) / (2.5 / 3 - 0.1))


def test_tag_average_and_an_unclear_teacher_gain():
    # tags A (prompts 0, 1) and B (prompt 2), headline = mean of tag means:
    # base 0; teacher A 1, B 0 -> 0.5; student A 0.5, B 1 -> 0.75; share 1.5
    tags = ["A", "A", "B"]
    share, _, _ = share_interval(scores([[0.0]] * 3, tags), scores([[1.0], [1.0], [0.0]], tags),
                                 [scores([[1.0], [0.0], [1.0]], tags)], average="tag")
    assert share == pytest.approx(1.5)
    # a teacher below the base on half the draws: share undefined there, the student gained -> +inf
    share, low, high = share_interval(scores([[0.0], [1.0]]), scores([[1.0], [0.0]]), [scores([[1.0], [1.0]])],
                                      num_resamples=400)
    assert math.isnan(share) and high == math.inf and math.isfinite(low)
    with pytest.raises(ValueError, match="different prompts"):
        share_interval(scores([[0.0]]), PromptScores("t", ["other"], ["t"], [[1.0]]), [scores([[0.5]])])


def write_samples(path, checkpoint, task, values, compress=False, key="s"):
    lines = [json.dumps({"checkpoint": checkpoint, "task": task, "index": i, "prompt_index": p,
                         "prompt": f"prompt {p}", "metadata": {"tag": "x"}, "scores": {key: v}})
             for i, (p, v) in enumerate(values)]
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    if compress:
        with gzip.open(path.with_suffix(".jsonl.gz"), "wt") as f:
            f.write(text)
    else:
        path.write_text(text)


def test_prompt_scores_and_row_shares_read_evaluation_folders(tmp_path, capsys):
    # prompt 1 listed first: groups come out by prompt_index
    write_samples(tmp_path / "base" / "samples.jsonl", "base", "ocr", [(1, 0.0), (0, 0.0), (0, 0.0)])
    write_samples(tmp_path / "runs" / "teacher_ocr" / "eval" / "samples.jsonl", "teacher_ocr", "ocr",
                  [(1, 1.0), (0, 1.0), (0, 1.0)], compress=True)
    for seed, v in (("mopd_seed0", 0.5), ("mopd_seed1", 0.7)):
        write_samples(tmp_path / "runs" / seed / "eval" / "samples.jsonl", seed, "ocr", [(1, v), (0, v), (0, v)])
    got = prompt_scores(tmp_path / "base" / "samples.jsonl", "base", "ocr", "s")
    assert got.prompts == ["prompt 0", "prompt 1"] and got.groups == [[0.0, 0.0], [0.0]]
    with pytest.raises(KeyError, match="no score 'other'"):
        prompt_scores(tmp_path / "base" / "samples.jsonl", "base", "ocr", "other")
    bases = {"dense": tmp_path / "base_dense", "eval": tmp_path / "base"}
    out = row_shares(tmp_path / "runs", bases, {"mopd": {"seeds": ["mopd_seed0", "mopd_seed1"]}},
                     {"mopd": ["ocr"], "sopd_geneval": ["geneval"]}, {"ocr": "ocr/s", "geneval": "geneval/s"},
                     {"ocr": "image"})
    # no dense evaluations: the regular ones, 1 image on prompt 1 (the fewest)
    # the seeds' own shares 0.5 and 0.7: mean 0.6, sd 0.1414, 0.6 ± 12.706 · 0.1414 / √2 = 0.6 ± 1.2706
    assert out == {"mopd": pytest.approx({"gain_share/ocr": 0.6, "gain_share/ocr/ci_low": 0.6,
                                          "gain_share/ocr/ci_high": 0.6, "gain_share/ocr/images_per_prompt": 1,
                                          "gain_share/ocr/seeds_ci_low": 0.6 - 1.2706,
                                          "gain_share/ocr/seeds_ci_high": 0.6 + 1.2706}, abs=1e-4)}
    assert "sopd_geneval/geneval" in capsys.readouterr().out
    # dense evaluations of base, teacher and both seeds: used (a share of (0.2 + 0.4) / 2 = 0.3)
    dense = [(0, 0.0), (0, 0.0), (1, 0.0), (1, 0.0)]
    write_samples(tmp_path / "base_dense" / "samples.jsonl", "base", "ocr", dense)
    write_samples(tmp_path / "runs" / "teacher_ocr" / "dense" / "samples.jsonl", "teacher_ocr", "ocr",
                  [(p, 1.0) for p, _ in dense])
    # each seed's dense images repeat its regular ones where both drew (prompt 0: images 0, 1; prompt 1: image 0)
    write_samples(tmp_path / "runs" / "mopd_seed0" / "dense" / "samples.jsonl", "mopd_seed0", "ocr",
                  [(0, 0.5), (0, 0.5), (1, 0.5), (1, -0.7)])
    args = (bases, {"mopd": {"seeds": ["mopd_seed0", "mopd_seed1"]}}, {"mopd": ["ocr"]}, {"ocr": "ocr/s"}, {})
    assert row_shares(tmp_path / "runs", *args)["mopd"]["gain_share/ocr"] == pytest.approx(0.6)  # seed 1 lacks it
    # a dense evaluation of another model (its shared images average 0.4, not its regular 0.7): refused
    write_samples(tmp_path / "runs" / "mopd_seed1" / "dense" / "samples.jsonl", "mopd_seed1", "ocr",
                  [(p, 0.4) for p, _ in dense])
    with pytest.raises(ValueError, match=r"mopd_seed1/dense/samples.jsonl:mopd_seed1 does not repeat .*mean 0.400 "
                                         r"against 0.700"):
        row_shares(tmp_path / "runs", *args)
    write_samples(tmp_path / "runs" / "mopd_seed1" / "dense" / "samples.jsonl", "mopd_seed1", "ocr",
                  [(0, 0.7), (0, 0.7), (1, 0.7), (1, -0.5)])
    got = row_shares(tmp_path / "runs", *args)["mopd"]  # means 0.2 and 0.4: a share of (0.2 + 0.4) / 2 = 0.3
    assert got["gain_share/ocr"] == pytest.approx(0.3) and got["gain_share/ocr/images_per_prompt"] == 2
    # a dense evaluation without the task falls back too
    write_samples(tmp_path / "base_dense" / "samples.jsonl", "base", "geneval", dense)
    assert row_shares(tmp_path / "runs", *args)["mopd"]["gain_share/ocr"] == pytest.approx(0.6)


def test_shared_images_gap_pairs_images_by_prompt_text_and_image_index(tmp_path):
    from opd.results.gain_share import shared_images_gap

    lines = [{"checkpoint": "m", "task": "t", "index": i, "prompt_index": p, "image_index": k, "prompt": f"p{p}",
              "scores": {"s": v}} for i, (p, k, v) in enumerate([(0, 1, 0.9), (0, 0, 0.1), (1, 0, 0.4)])]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    got = prompt_scores(tmp_path / "samples.jsonl", "m", "t", "s")
    assert got.groups == [[0.1, 0.9], [0.4]]  # by image index, not file order
    other = PromptScores("o", ["p1", "p9", "p0"], ["t"] * 3, [[0.5, 0.0], [1.0], [0.2]])
    # shared: p0 image 0 (0.1 | 0.2), p1 image 0 (0.4 | 0.5); p9 and the second images are not
    assert shared_images_gap(got, other) == pytest.approx((0.25, 0.35, 2))
    with pytest.raises(ValueError, match="share no images"):
        shared_images_gap(got, PromptScores("x", ["p7"], ["t"], [[1.0]]))
    # the same prompt list, a text twice: paired by position, not by the text's last group
    twice = PromptScores("a", ["q", "q"], ["t"] * 2, [[1.0], [0.0]])
    assert shared_images_gap(twice, PromptScores("b", ["q", "q"], ["t"] * 2, [[1.0, 0.5], [0.0]])) == pytest.approx((0.5, 0.5, 2))


def test_seed_shares_are_each_seeds_own_and_average_to_the_share_of_their_mean():
    from opd.results.gain_share import format_share, seed_shares

    tags = ["a", "a", "b"]
    base, teacher = scores([[0.0], [0.0], [0.2]], tags), scores([[1.0], [0.0], [0.6]], tags)
    students = [scores([[0.5], [0.0], [0.4]], tags), scores([[1.0], [0.0], [0.2]], tags)]
    # by image: base 0.0667, teacher 0.5333; students 0.3 and 0.4 → (0.3 - 1/15) / (7/15) = 0.5, (0.4 - 1/15) / (7/15) = 5/7
    assert seed_shares(base, teacher, students) == pytest.approx([0.5, 5 / 7])
    # by tag: base (0 + 0.2) / 2 = 0.1, teacher (0.5 + 0.6) / 2 = 0.55; students 0.325 and 0.35
    assert seed_shares(base, teacher, students, "tag") == pytest.approx([0.225 / 0.45, 0.25 / 0.45])
    share, _, _ = share_interval(base, teacher, students, "tag", num_resamples=10)
    assert share == pytest.approx(np.mean(seed_shares(base, teacher, students, "tag")))
    assert all(math.isnan(v) for v in seed_shares(teacher, base, students))  # the "teacher" did not gain
    one = {"gain_share/ocr": 0.87, "gain_share/ocr/ci_low": 0.76, "gain_share/ocr/ci_high": 0.98}
    assert format_share(one, "ocr") == "87% [76, 98]"
    both = {**one, "gain_share/ocr/seeds_ci_low": 0.79, "gain_share/ocr/seeds_ci_high": 0.95}
    assert format_share(both, "ocr", " %") == "87 % [76, 98] over prompts, [79, 95] over seeds"


def test_target_lines_judge_share_floor_and_baseline_by_hand():
    from opd.results.table1 import NORM_GAIN, target_lines

    own = {"geneval": "geneval/x", "ocr": "ocr/y", "aesthetic": "aesthetic/z"}
    mopd = {"gain_share/geneval": 0.94, "gain_share/geneval/ci_low": 0.63,   # lower end short
            "gain_share/ocr": 0.96, "gain_share/ocr/ci_low": 0.88,           # both met
            "gain_share/aesthetic": 0.85, "gain_share/aesthetic/ci_low": 0.70,  # both short
            NORM_GAIN: 0.9, f"{NORM_GAIN}/ci_low": 0.8, f"{NORM_GAIN}/ci_high": 1.0}
    multi = {NORM_GAIN: 0.5, f"{NORM_GAIN}/ci_low": 0.4, f"{NORM_GAIN}/ci_high": 0.79}
    lines = target_lines({"mopd": mopd, "multi_reward_rl": multi}, own)
    assert lines[0].endswith("missed (the lower end)") and "keeps 94%" in lines[0]
    assert lines[1].endswith(": met")
    assert lines[2].endswith("missed (the share and the lower end)")
    assert lines[3].endswith("above it, intervals apart: met")
    # with seeds: the lower of the two lower ends counts (OCR's seeds reach down to 0.74)
    lines = target_lines({"mopd": {**mopd, "gain_share/ocr/seeds_ci_low": 0.74}, "multi_reward_rl": multi}, own)
    assert "lower end 88% over prompts, 74% over seeds" in lines[1] and lines[1].endswith("missed (the lower end)")
    lines = target_lines({"mopd": {**mopd, "gain_share/ocr/seeds_ci_low": 0.80}, "multi_reward_rl": multi}, own)
    assert lines[1].endswith(": met")
    # the baseline's interval reaching the student's: not a clear win
    lines = target_lines({"mopd": mopd, "multi_reward_rl": {**multi, f"{NORM_GAIN}/ci_high": 0.81}}, own)
    assert lines[3].endswith("missed")
    # one seed each: no interval over seeds, said so
    lines = target_lines({"mopd": {NORM_GAIN: 0.9}, "multi_reward_rl": {NORM_GAIN: 0.5}}, own)
    assert "no interval yet" in lines[0] and "needs two seeds" in lines[3] and len(lines) == 4
    # multi-reward RL at MOPD's total compute, when the table has it, is compared the same way
    total = {NORM_GAIN: 0.72, f"{NORM_GAIN}/ci_low": -0.13, f"{NORM_GAIN}/ci_high": 1.57}
    lines = target_lines({"mopd": mopd, "multi_reward_rl": multi, "multi_total": total}, own)
    assert lines[3].endswith("above it, intervals apart: met") and len(lines) == 5
    assert lines[4] == ("- average share of the teachers' gains: 0.90 [0.80, 1.00] against multi_total's "
                        "0.72 [-0.13, 1.57]: intervals overlap or below: missed")


def test_projected_interval_by_hand():
    base, teacher = scores([[0.0, 0.0]] * 4), scores([[1.0, 1.0]] * 4)  # gain 1: the share is the student's mean
    # all spread within prompts: var([0, 1]) / 2 images = 0.25 per prompt mean, none between prompts;
    # with k images a prompt: se = sqrt(0.25 * 2 / k / 4 prompts)
    within = scores([[0.0, 1.0]] * 4)
    for k in (2, 8):
        low, high = projected_interval(base, teacher, [within], k)
        half = 1.959964 * math.sqrt(0.25 * 2 / k / 4)
        assert (low, high) == pytest.approx((0.5 - half, 0.5 + half), abs=1e-6)
    # all spread between prompts: more images change nothing; se = sqrt(var([1, 0, 1, 0]) / 4)
    between = scores([[1.0, 1.0], [0.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    assert projected_interval(base, teacher, [between], 2) == pytest.approx(projected_interval(base, teacher, [between], 64))
    assert projected_interval(base, teacher, [between], 2)[1] == pytest.approx(0.5 + 1.959964 * math.sqrt(1 / 3 / 4), abs=1e-6)
    with pytest.raises(ValueError, match="same number"):
        projected_interval(base, teacher, [scores([[0.0, 1.0]] * 3 + [[1.0]])], 4)
    with pytest.raises(ValueError, match="did not gain"):
        projected_interval(teacher, base, [within], 4)


def test_the_command_prints_share_interval_and_projection(tmp_path, capsys):
    for name, values in (("base", [0.0, 0.0]), ("teacher_ocr", [1.0, 1.0]), ("student", [0.0, 1.0])):
        write_samples(tmp_path / f"{name}.jsonl", name, "ocr", [(p, v) for p in range(4) for v in values])
    out = main(["--task", "ocr", "--metric", "s", "--base", f"{tmp_path}/base.jsonl:base",
                "--teacher", f"{tmp_path}/teacher_ocr.jsonl:teacher_ocr", "--student", f"{tmp_path}/student.jsonl:student",
                "--project", "8"])
    assert out["share"] == 0.5 and out["ci_low"] == out["ci_high"] == 0.5  # every prompt alike: no prompt noise
    assert out["projected_8"] == pytest.approx((0.5 - 1.959964 * 0.125, 0.5 + 1.959964 * 0.125), abs=1e-6)
    assert "share 0.500 [0.500, 0.500] with 2 images a prompt" in capsys.readouterr().out
