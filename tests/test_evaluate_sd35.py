"""The SD3.5 evaluation suite end to end on the tiny random SD3 with random-weight reward stand-ins;
its errors (prompt files, weights) before any model loads; the Table 1 layout; checkpoint specs."""
import json
import math

import pytest
from hydra.errors import InstantiationException

from conftest import ROOT
from opd.evaluate import evaluate, takes_random_flag
from opd.evaluation.checkpoints import Checkpoint, parse_checkpoints
from opd.evaluation.report import main_table, normalised_average


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompts")
    shipped = [json.loads(x) for x in (ROOT / "data/geneval/evaluation_metadata.jsonl").read_text().splitlines()]
    picked = [next(r for r in shipped if r["tag"] == tag) for tag in ("single_object", "counting", "colors")]
    (root / "geneval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in picked))
    (root / "ocr.txt").write_text('a sign that says "OPD"\na sign that says "K7"\n')
    (root / "drawbench.txt").write_text("a red bicycle in the snow\na cat reading a newspaper\n")
    (root / "pickapic.txt").write_text("a castle at dawn, oil painting\n")
    return root


def unready(reward) -> bool:
    """Needs weights (``weights_dir``) or a server (``url``) and has no random stand-in."""
    return ("weights_dir" in reward or "url" in reward) and not takes_random_flag(reward)


def sd35_overrides(files, extra=()):
    return ["eval_tasks=sd35", "model=sd3_tiny_random", "num_steps=2", "device=cpu", "batch_size=4",
            "max_prompts=3", "images_per_prompt=1", f"eval_tasks.geneval.prompts.path={files / 'geneval.jsonl'}",
            f"eval_tasks.ocr.prompts.path={files / 'ocr.txt'}",
            f"eval_tasks.drawbench.prompts.path={files / 'drawbench.txt'}",
            f"eval_tasks.pickapic.prompts.path={files / 'pickapic.txt'}", *extra]


def test_sd35_suite_end_to_end_on_random_stand_ins(cfg_factory, prompt_files, tmp_path, monkeypatch):
    """Every task and every reward of the suite, each reward on its random stand-in (no weights, no
    servers): the whole report comes out, and says its numbers are meaningless."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OPD_UNIFIEDREWARD_URL", "http://127.0.0.1:9")  # nothing answers: the stand-in must not ask
    # one checkpoint (the base at its own CFG, the dict form) keeps this CPU run short; adapters and
    # several checkpoints are covered on the mini model (test_evaluate*.py)
    cfg = cfg_factory("eval", sd35_overrides(prompt_files, [
        "random_weights_for_tests=true", "checkpoints.base={adapter:null,guidance_scale:1.0}",
        f"paths.weights_dir={tmp_path / 'no_weights'}"]))
    assert set(cfg.eval_tasks) == {"geneval", "ocr", "drawbench", "pickapic"}
    results = evaluate(cfg)
    assert set(results) == {"base"}
    ckpt = results["base"]
    tags = [ckpt[f"geneval/geneval_correct/{t}"] for t in ("colors", "counting", "single_object")]
    assert ckpt["geneval/geneval_correct"] == pytest.approx(sum(tags) / 3)  # GenEval: mean over tags
    assert 0.0 <= ckpt["ocr/ocr"] <= 1.0 and 0.0 <= ckpt["ocr/ocr_exact"] <= 1.0
    for task in ("drawbench", "pickapic"):
        for key in ("pickscore_raw", "clipscore", "hpsv21", "laion_aesthetic", "imagereward", "unifiedreward_raw"):
            assert math.isfinite(ckpt[f"{task}/{key}"]), (task, key)
        assert 1.0 <= ckpt[f"{task}/unifiedreward_raw"] <= 5.0
    lines = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    rows = {"geneval": 3, "ocr": 2, "drawbench": 2, "pickapic": 1}
    assert len(lines) == sum(rows.values())
    assert all((tmp_path / line["image"]).is_file() for line in lines)
    md = (tmp_path / "results.md").read_text()
    warning = md.split("RANDOM-WEIGHT STAND-INS")[1].splitlines()[0]
    assert "meaningless" in warning
    for name in ("geneval", "pickscore", "clipscore", "hpsv21", "laion_aesthetic", "imagereward", "unifiedreward"):
        assert name in warning, name
    assert "| checkpoint | CFG | GenEval | OCR | PickScore | CLIPScore | HPSv2.1 | Aesthetic | ImageReward " \
           "| UnifiedReward |" in md and "avg (min–max norm.)" in md
    assert "| base | 1 |" in md
    for f in ("results.json", "scores.png", *(f"grids/base_{task}.png" for task in rows)):
        assert (tmp_path / f).is_file(), f


def test_every_sd35_reward_has_random_stand_ins(cfg_factory, prompt_files):
    cfg = cfg_factory("eval", ["eval_tasks=sd35"])
    missing = [f"{t}.{k}" for t, spec in cfg.eval_tasks.items() for k, r in spec.rewards.items() if unready(r)]
    assert not missing, missing


def sd35_stub(tmp_path):
    """A folder that passes the pre-load check of model.path (opd.validate) but holds no weights."""
    (tmp_path / "sd35").mkdir()
    (tmp_path / "sd35" / "model_index.json").write_text("{}")
    return f"model.path={tmp_path / 'sd35'}"


def test_missing_prompt_file_fails_before_any_model_loads(cfg_factory, tmp_path):
    # the default paths point at files this checkout lacks; the GenEval weights are missing too, but the
    # prompt files are read first, so the message is about the file (a missing model.path is reported
    # before either: tests/test_bad_inputs.py)
    with pytest.raises(InstantiationException, match=r"(?s)eval_tasks\.ocr\.prompts.*ocr/test\.txt not found"):
        evaluate(cfg_factory("eval", ["eval_tasks=sd35", "model=sd35_medium", sd35_stub(tmp_path),
                                      f"paths.weights_dir={tmp_path}"]))


def test_missing_reward_weights_fail_before_the_model_loads(cfg_factory, prompt_files, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # model=sd35_medium has no weights here either: reaching it would fail with another message
    cfg = cfg_factory("eval", sd35_overrides(prompt_files, ["model=sd35_medium", sd35_stub(tmp_path),
                                                            f"paths.weights_dir={tmp_path}"]))
    with pytest.raises(InstantiationException, match="(?s)GenEval reward.*not found.*huggingface-cli download"):
        evaluate(cfg)
    assert not (tmp_path / "images").exists()


def test_checkpoint_specs_plain_and_with_their_own_cfg():
    spec = {"base": None, "student": "/a/lora", "teacher": {"adapter": "/b", "guidance_scale": 1.0},
            "base_cfg1": {"adapter": None, "guidance_scale": 1.0}, "same": {"adapter": "/c"}}
    assert parse_checkpoints(spec, 4.5) == [Checkpoint("base", None, 4.5), Checkpoint("student", "/a/lora", 4.5),
                                            Checkpoint("teacher", "/b", 1.0), Checkpoint("base_cfg1", None, 1.0),
                                            Checkpoint("same", "/c", 4.5)]
    with pytest.raises(ValueError, match="checkpoints.x: unknown key.*guidance"):
        parse_checkpoints({"x": {"path": "/a"}}, 4.5)


def test_normalised_average_and_its_bounds():
    results = {"a": {"g": 0.0, "p": 10.0, "t": 1.0}, "b": {"g": 1.0, "p": 20.0, "t": 1.0},
               "c": {"g": 0.5, "p": 20.0, "t": 1.0}}
    averages, bounds = normalised_average(results, ["g", "p", "t"])
    assert bounds == {"g": (0.0, 1.0), "p": (10.0, 20.0)}  # "t" ties everywhere: no information
    assert averages == pytest.approx({"a": 0.0, "b": 1.0, "c": 0.75})
    table, note = main_table(results, {"GenEval": "g", "PickScore": "p", "T": "t"}, {"a": 4.5, "b": 4.5, "c": 1.0})
    assert "| c | 1 | 0.500 | 20.00 | 1.000 | 0.750 |" in table
    assert "GenEval [0.000, 1.000], PickScore [10.00, 20.00]" in note and "all checkpoints tie): T" in note
    # the same model saved in fp16 and fp32: scores equal up to float32 rounding are a tie, not 0 vs 1
    same = {"fp32": {"g": 0.9197092950344086, "o": 0.5}, "fp16": {"g": 0.9197093322873116, "o": 0.5}}
    averages, bounds = normalised_average(same, ["g", "o"])
    assert bounds == {} and all(math.isnan(a) for a in averages.values())  # no information: shown as "–"
