"""An evaluation task: a prompt set, the rewards that score it and how its headline averages.

Score keys: reward ``name``'s key ``"reward"`` is reported as ``name``, any other key ``k`` as
``name_k`` (``{"ocr": OCRReward}`` → ``ocr``, ``ocr_exact``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from torch import Tensor

from opd.rewards.base import Reward

#: words a tag may not be: they end metric names of their own (:mod:`opd.evaluation.report`)
RESERVED_TAGS = frozenset({"ci_low", "ci_high", "swapped"})
#: a reward (score key) may not be called this: ``<task>/sensitivity`` is the prompt-sensitivity control
SENSITIVITY = "sensitivity"


def score_key(reward: str, key: str) -> str:
    """The reported name of reward ``reward``'s score ``key``."""
    return reward if key == "reward" else f"{reward}_{key}"


@dataclass(frozen=True)
class CoverSpec:
    """The cover search of a task (:func:`opd.evaluation.controls.find_cover`): ``num_scenes``
    random mini-world scenes (``random.Random(seed)``), judged on ``rows`` (training prompts)."""

    rows: list[dict[str, Any]]
    num_scenes: int = 1000
    seed: int = 0


@dataclass
class EvalTask:
    """A prompt set (metadata rows with ``prompt`` and ``tag``) and the rewards that score it.

    ``average="tag"`` makes the headline of every score the mean of its per-tag means (GenEval's
    overall score) instead of the mean over images. ``table`` maps a results.md column header to
    a score key of this task (``{"GenEval": "geneval_correct"}``). ``cover``: the task's cover
    search, or ``None`` for none.
    """

    name: str
    rows: list[dict[str, Any]]
    rewards: dict[str, Reward]
    average: str = "image"
    table: dict[str, str] = field(default_factory=dict)
    cover: CoverSpec | None = None

    def __post_init__(self) -> None:
        if self.average not in ("image", "tag"):
            raise ValueError(f"eval_tasks.{self.name}.average={self.average!r}: use 'image' or 'tag'")
        clash = sorted({self.tag(r) for r in self.rows} & RESERVED_TAGS)
        if clash:
            raise ValueError(f"eval_tasks.{self.name}: tag(s) {clash} are reserved for metric names; rename them")
        if SENSITIVITY in self.rewards:
            raise ValueError(f"eval_tasks.{self.name}.rewards.{SENSITIVITY}: the name is reserved; rename the reward")

    def tag(self, row: dict[str, Any]) -> str:
        """A row's tag (the task's name when it has none)."""
        return row.get("tag", self.name)

    def score(self, images: Tensor, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        """Every reward's scores of ``images [B, …]`` under ``rows``: ``{score key: Tensor[B]}`` on CPU."""
        prompts = [r["prompt"] for r in rows]
        out: dict[str, Tensor] = {}
        for name, reward in self.rewards.items():
            for key, value in reward.score(images, prompts, rows).items():
                out[score_key(name, key)] = value.detach().float().cpu()
        return out

    def score_matrix(self, images: Tensor, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        """Every reward's :meth:`~opd.rewards.base.Reward.score_matrix`: ``{score key: Tensor[N, M]}``."""
        out: dict[str, Tensor] = {}
        for name, reward in self.rewards.items():
            for key, value in reward.score_matrix(images, rows).items():
                out[score_key(name, key)] = value.detach().float().cpu()
        return out

    @property
    def headline_key(self) -> str:
        """The score key the task is judged by: its first ``table`` column, else its first reward."""
        return next(iter(self.table.values()), next(iter(self.rewards)))

    def reward_of(self, key: str) -> tuple[str, str]:
        """Score key → (reward name, that reward's own key); the longest matching reward name wins."""
        for name in sorted(self.rewards, key=len, reverse=True):
            if key == name:
                return name, "reward"
            if key.startswith(name + "_"):
                return name, key[len(name) + 1 :]
        raise KeyError(f"eval_tasks.{self.name}: no reward gives the score {key!r} (rewards: {sorted(self.rewards)})")

    @cached_property
    def partners(self) -> list[int | None]:
        """Each row's swapped-prompt partner (:func:`opd.evaluation.controls.derangement`)."""
        from opd.evaluation.controls import derangement

        return derangement([{"prompt": r["prompt"], "tag": self.tag(r)} for r in self.rows])
