"""Random-weight stand-ins (``random_weights_for_tests=True``) of the real-scale rewards: built from
their own configs with no weights folder and no network, of the released architecture's class,
flagged (``stand_in``, a log warning), and scoring a batch in the real reward's output format."""
from __future__ import annotations

import logging

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from conftest import CONF
from opd.rewards.aesthetic import AestheticHead, LaionAesthetic
from opd.rewards.base import Reward
from opd.rewards.clipscore import CLIPScore
from opd.rewards.hps import HPSv21
from opd.rewards.imagereward import ImageReward, ImageRewardModel
from opd.rewards.pickscore import PickScore
from opd.rewards.remote import GenEvalRemote, UnifiedRewardRemote
from opd.rewards.weights import WEIGHTS_ENV

PROMPTS = ["a photo of a cat", 'a sign that says "Hello World"', "zwei Hunde auf einem roten Sofa, ölgemälde"]
#: conf/reward/<file>.yaml → (its key, the keys its score returns)
CONFIGS = {"pickscore": ("pickscore", {"reward", "raw"}), "clipscore": ("clipscore", {"reward", "x100"}),
           "hpsv21": ("hpsv21", {"reward"}), "laion_aesthetic": ("laion_aesthetic", {"reward"}),
           "imagereward": ("imagereward", {"reward"}), "unifiedreward_remote": ("unifiedreward", {"reward", "raw"}),
           "geneval_remote": ("geneval", {"reward", "strict_correct"})}


@pytest.fixture(autouse=True)
def _no_weights_no_network(monkeypatch, tmp_path):
    """An empty weights folder, an offline hub and unreachable servers: a stand-in must need none."""
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "no_weights"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("OPD_UNIFIEDREWARD_URL", "http://127.0.0.1:9")  # the discard port: nothing answers
    monkeypatch.setenv("OPD_GENEVAL_URL", "http://127.0.0.1:9")


def from_config(name: str, tmp_path) -> Reward:
    """The reward of conf/reward/<name>.yaml with the stand-in flag, as the tests' overrides give it."""
    key, _ = CONFIGS[name]
    cfg = OmegaConf.merge(OmegaConf.load(CONF / "reward" / f"{name}.yaml"),
                          {"paths": {"weights_dir": str(tmp_path / "no_weights")}})
    spec = cfg[key]
    return hydra.utils.instantiate(spec, random_weights_for_tests=True)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_stand_in_builds_from_its_config_without_weights_or_server(name, tmp_path, caplog):
    if name == "hpsv21":
        pytest.importorskip("open_clip", reason="HPSv2.1 needs open_clip_torch (the `dev` extra)")
    with caplog.at_level(logging.WARNING):
        reward = from_config(name, tmp_path)
    assert reward.stand_in is True
    assert any("STAND-IN" in r.getMessage() and "mean nothing" in r.getMessage() for r in caplog.records)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 48, 40, generator=g)
    images[0] = 0.9  # a bright image and two darker ones: the scores must tell them apart
    metadata = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}]}] * 3
    out = reward.score(images, PROMPTS, metadata)
    assert set(out) == CONFIGS[name][1]
    for value in out.values():
        assert value.shape == (3,) and value.dtype == torch.float32 and torch.isfinite(value).all()
    assert len(set(out["reward"].tolist())) > 1  # not a constant: training on it moves the policy
    again = from_config(name, tmp_path).score(images, PROMPTS, metadata)
    for key in out:  # deterministic: same seed, same scores
        torch.testing.assert_close(out[key], again[key])


def test_stand_ins_are_the_released_architecture_classes():
    from transformers import CLIPModel

    for cls in (PickScore, CLIPScore):
        assert type(cls(random_weights_for_tests=True).encoder.model) is CLIPModel
    aesthetic = LaionAesthetic(random_weights_for_tests=True)
    assert type(aesthetic.encoder.model) is CLIPModel and type(aesthetic.head) is AestheticHead
    assert type(ImageReward(random_weights_for_tests=True).model) is ImageRewardModel
    open_clip = pytest.importorskip("open_clip", reason="HPSv2.1 needs open_clip_torch (the `dev` extra)")
    assert type(HPSv21(random_weights_for_tests=True).model) is open_clip.CLIP  # create_model("ViT-H-14")'s class


def test_stand_ins_leave_the_callers_random_stream_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    PickScore(random_weights_for_tests=True)
    ImageReward(random_weights_for_tests=True)
    torch.testing.assert_close(torch.rand(4), expected)


def test_remote_stand_ins_score_in_the_servers_ranges():
    images = torch.stack([torch.zeros(3, 8, 8), torch.full((3, 8, 8), 0.5), torch.ones(3, 8, 8)])
    unified = UnifiedRewardRemote(random_weights_for_tests=True).score(images, ["a"] * 3, [{}] * 3)
    torch.testing.assert_close(unified["raw"], torch.tensor([1.0, 1.0 + 4 * 128 / 255, 5.0]))
    torch.testing.assert_close(unified["reward"], unified["raw"] / 5)
    meta = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}]}] * 3
    geneval = GenEvalRemote(only_strict=False, random_weights_for_tests=True).score(images, ["a"] * 3, meta)
    assert geneval["correct"].tolist() == geneval["strict_correct"].tolist() == [0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="lacks GenEval's 'tag'/'include'"):  # the protocol still holds
        GenEvalRemote(random_weights_for_tests=True).score(images, ["a"] * 3, [{}] * 3)


def test_real_rewards_are_not_stand_ins():
    assert Reward.stand_in is False
    assert UnifiedRewardRemote().stand_in is False  # a client builds without its server
