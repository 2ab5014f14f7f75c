"""Rewards computed by HTTP(S) reward servers, in the protocol of Flow-GRPO's ``reward-server``.

GenEval needs mmdetection's Mask2Former and UnifiedReward a 7B VLM; the references run each as a
server in its own environment and talk to it from training. The protocol (Flow-GRPO's
``geneval_score`` / ``unifiedreward_score_remote`` and ``reward-server/app_geneval.py``): one
``POST`` per batch of at most 64 images, body = ``pickle.dumps(dict)`` with the images as JPEG
bytes (PIL's default quality, 75), answer = a pickled dict; a server-side failure answers HTTP 500
with the traceback as text.

- GenEval request ``{"images", "meta_datas", "only_strict"}`` → ``{"scores", "rewards",
  "strict_rewards", "group_rewards", "group_strict_rewards"}``: ``scores`` is the partial training
  score (docs/algorithms.md, Rewards), ``strict_rewards`` exact-count correctness, ``rewards`` GenEval's own
  correctness (not computed, all 0, when ``only_strict``).
- UnifiedReward request ``{"images", "prompts"}`` → ``{"outputs"}``: one 1–5 score per image (a
  number, or the model's text with ``Final Score: x``); reward = score / 5.

The client (deadline, retries, https, replies that cannot run code) is
:class:`opd.rewards.remote_client.RewardServerClient`; docs/reliability.md lists its cases.

``random_weights_for_tests=True`` replaces the server by a local, deterministic stand-in (no
network): scores of the same shape and range, computed from the images' mean brightness, so they
vary between images (tests of training need a non-constant reward) and mean nothing.
"""
from __future__ import annotations

import io
import numbers
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from opd.rewards.base import Reward, check_batch, mark_stand_in, to_uint8_hwc
from opd.rewards.remote_client import (
    InsecureRewardServerWarning,
    RemoteRewardError,
    RemoteRewardTimeout,
    RemoteRewardUnreachable,
    RewardServerClient,
    safe_loads,
)

__all__ = ["GenEvalRemote", "InsecureRewardServerWarning", "RemoteRewardError", "RemoteRewardTimeout",
           "RemoteRewardUnreachable", "RewardServerClient", "UnifiedRewardRemote", "jpeg_bytes", "parse_score",
           "safe_loads"]


def jpeg_bytes(images: Tensor, quality: int = 75) -> list[bytes]:
    """``[B, 3, H, W]`` in [0, 1] → JPEG files (bytes), as the reference clients encode them."""
    out = []
    for image in to_uint8_hwc(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        out.append(buffer.getvalue())
    return out


# --- the restricted unpickler -------------------------------------------------------------------

def _column(reply: dict[str, Any], key: str, size: int, what: str) -> list[Any]:
    """``reply[key]`` as a list of ``size`` values, or a clear protocol error."""
    if key not in reply:
        raise RemoteRewardError(f"{what}: the server's answer lacks {key!r} (has {sorted(reply)})")
    values = list(reply[key])
    if len(values) != size:
        raise RemoteRewardError(f"{what}: the server returned {len(values)} {key!r} for {size} images")
    return values


def _batches(size: int, batch_size: int) -> list[slice]:
    return [slice(start, start + batch_size) for start in range(0, size, batch_size)]


def stand_in_level(images: Tensor) -> Tensor:
    """The local stand-ins' score in [0, 1]: each image's mean brightness after the 8-bit rounding
    the servers would see. Deterministic, cheap, varies between images; ``float32 [B]`` on CPU."""
    pixels = (images.detach().float().clamp(0, 1) * 255).round()
    return (pixels.mean(dim=(1, 2, 3)) / 255).cpu()


class ServerReward(Reward):
    """What every server-backed reward shares: the client (named by the class) or, with
    ``random_weights_for_tests``, no client and the stand-in mark; requests of at most ``batch_size``
    JPEG images."""

    def __init__(self, url: str, batch_size: int, timeout: float, max_retries: int, backoff_s: float,
                 verify: bool, ca_bundle: str | None, jpeg_quality: int, random_weights_for_tests: bool) -> None:
        self.client = None if random_weights_for_tests else RewardServerClient(
            url, type(self).__name__, timeout=timeout, max_retries=max_retries, backoff_s=backoff_s,
            verify=verify, ca_bundle=ca_bundle)
        if random_weights_for_tests:
            mark_stand_in(self, f"a local function of image brightness answers instead of the server at {url}")
        self.batch_size = batch_size
        self.jpeg_quality = jpeg_quality

    def post_batches(self, images: Tensor, fields: Callable[[slice], dict[str, Any]]
                     ) -> Iterator[tuple[slice, dict[str, Any]]]:
        """``(part, reply)`` per request: ``images[part]`` as JPEG under ``"images"`` plus ``fields(part)``."""
        for part in _batches(images.shape[0], self.batch_size):
            yield part, self.client.post({"images": jpeg_bytes(images[part], self.jpeg_quality), **fields(part)})


class GenEvalRemote(ServerReward):
    """GenEval through Flow-GRPO's GenEval server.

    ``score`` returns ``"reward"`` (the partial score Flow-GRPO trains on), ``"strict_correct"``
    (all counts exact) and, unless ``only_strict``, ``"correct"`` (GenEval's published
    correctness), each ``float32 [B]``. ``metadata[i]`` is the prompt's GenEval metadata
    (``tag``, ``include``, ``exclude``; ``prompt`` is filled in from ``prompts`` when absent).

    Args:
        url: the server; ``batch_size`` images per request (64, as the reference).
        only_strict: skip GenEval's own correctness on the server (Flow-GRPO's training default).
        timeout, max_retries, backoff_s, verify, ca_bundle: see :class:`RewardServerClient` (one
            deadline per request; retries of timeouts, connection errors and HTTP 5xx; TLS).
        jpeg_quality: JPEG quality of the sent images (PIL's default, 75, as the reference).
        random_weights_for_tests: no server: a local stand-in answers (tests only; module
            docstring): ``reward`` = mean brightness, ``strict_correct`` (and ``correct``) =
            ``reward > 0.5``. ``stand_in`` is then True and a warning is logged.
    """

    name = "geneval"

    def __init__(self, url: str = "http://127.0.0.1:18085", only_strict: bool = True, batch_size: int = 64,
                 timeout: float = 120.0, max_retries: int = 2, backoff_s: float = 1.0, verify: bool = True,
                 ca_bundle: str | None = None, jpeg_quality: int = 75,
                 random_weights_for_tests: bool = False) -> None:
        super().__init__(url, batch_size, timeout, max_retries, backoff_s, verify, ca_bundle, jpeg_quality,
                         random_weights_for_tests)
        self.only_strict = only_strict

    def score(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> dict[str, Tensor]:
        """``images [B, 3, H, W]`` in [0, 1] → ``{"reward", "strict_correct"[, "correct"]}``."""
        check_batch(images, prompts, metadata)
        for i, meta in enumerate(metadata):
            if "tag" not in meta or "include" not in meta:
                raise ValueError(f"GenEvalRemote: metadata[{i}] lacks GenEval's 'tag'/'include' "
                                 f"(prompt {prompts[i]!r}); use GenEval's *_metadata.jsonl prompts")
        metas = [{"prompt": prompt, **meta} for prompt, meta in zip(prompts, metadata)]
        keys = {"reward": "scores", "strict_correct": "strict_rewards", "correct": "rewards"}
        if self.only_strict:
            del keys["correct"]
        if self.client is None:  # the local stand-in (random_weights_for_tests)
            level = stand_in_level(images)
            return {key: level if key == "reward" else (level > 0.5).float() for key in keys}
        out: dict[str, list[float]] = {key: [] for key in keys}
        for part, reply in self.post_batches(images, lambda part: {"meta_datas": metas[part],
                                                                   "only_strict": self.only_strict}):
            for key, column in keys.items():
                out[key] += [float(v) for v in _column(reply, column, len(metas[part]), "GenEvalRemote")]
        return {key: torch.tensor(values, dtype=torch.float32) for key, values in out.items()}


_FINAL_SCORE = re.compile(r"Final Score:\s*([1-5](?:\.\d+)?)")


def parse_score(output: Any) -> float | None:
    """A UnifiedReward answer as a number: numbers pass through, text is searched for
    ``Final Score: x`` (Flow-GRPO's pattern); ``None`` when there is none. Numbers include
    numpy's (``np.float32`` is no ``float``)."""
    if isinstance(output, numbers.Real):
        return float(output)
    match = _FINAL_SCORE.search(str(output))
    return float(match.group(1)) if match else None


class UnifiedRewardRemote(ServerReward):
    """UnifiedReward (a VLM judging prompt alignment and quality, 1–5) through a reward server.

    ``score`` returns ``"reward"`` = score / ``scale`` (Flow-GRPO: 5) and ``"raw"`` = the 1–5 score
    (the DiffusionOPD paper's Table 1 reports it, e.g. 3.03). An answer without a score counts 0, as in the
    reference, with a warning.

    Args:
        url, batch_size, timeout, max_retries, backoff_s, verify, ca_bundle, jpeg_quality: as
            :class:`GenEvalRemote`.
        scale: divisor of the raw score.
        random_weights_for_tests: no server: a local stand-in answers (tests only; module
            docstring): ``raw`` = 1 + 4 · mean brightness, in the server's 1–5 range. ``stand_in``
            is then True and a warning is logged.
    """

    name = "unifiedreward"

    def __init__(self, url: str = "http://127.0.0.1:18087", batch_size: int = 64, timeout: float = 300.0,
                 max_retries: int = 2, backoff_s: float = 1.0, verify: bool = True, ca_bundle: str | None = None,
                 jpeg_quality: int = 75, scale: float = 5.0, random_weights_for_tests: bool = False) -> None:
        super().__init__(url, batch_size, timeout, max_retries, backoff_s, verify, ca_bundle, jpeg_quality,
                         random_weights_for_tests)
        self.scale = scale

    def score(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> dict[str, Tensor]:
        """``images [B, 3, H, W]`` in [0, 1] → ``{"reward": raw / scale, "raw": 1–5 score}``."""
        check_batch(images, prompts, metadata)
        if self.client is None:  # the local stand-in (random_weights_for_tests)
            values = 1.0 + 4.0 * stand_in_level(images)
            return {"reward": values / self.scale, "raw": values}
        raw: list[float] = []
        for part, reply in self.post_batches(images, lambda part: {"prompts": list(prompts[part])}):
            raw += self._scores(_column(reply, "outputs", len(prompts[part]), "UnifiedRewardRemote"))
        values = torch.tensor(raw, dtype=torch.float32)
        return {"reward": values / self.scale, "raw": values}

    @staticmethod
    def _scores(outputs: Sequence[Any]) -> list[float]:
        scores = []
        for output in outputs:
            value = parse_score(output)
            if value is None:
                warnings.warn(f"UnifiedRewardRemote: no score in the server's answer {str(output)[:200]!r}; "
                              "scoring it 0", RuntimeWarning)
            scores.append(0.0 if value is None else value)
        return scores
