"""OCR reward: how well the text asked for in the prompt can be read back from the image.

Scored as Flow-GRPO does (docs/algorithms.md, Rewards): the recognised lines with confidence > 0 are joined
with nothing and compared with the target by :func:`opd.rewards.text_match.ocr_accuracy`; any
failure scores 0. The OCR engine is pluggable (:class:`OCREngine`); ``"rapidocr"`` runs PP-OCRv4's
ONNX models shipped inside the ``rapidocr-onnxruntime`` wheel, fully offline, on CPU; ``"easyocr"``
runs EasyOCR's CRAFT detector and English recogniser from local weight files (never downloaded).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import cv2
import numpy as np
import torch
from torch import Tensor

from opd.rewards.base import Reward, check_batch, to_uint8_hwc
from opd.rewards.text_match import exact_match, ocr_accuracy, quoted_text
from opd.rewards.weights import MissingWeightsError, resolve_weights


class OCREngine(Protocol):
    """Reads text lines from one image."""

    def read(self, image: np.ndarray) -> list[tuple[str, float]]:
        """``image``: ``uint8 [H, W, 3]`` RGB → ``[(text, confidence), ...]`` in reading order
        (top to bottom, left to right); ``[]`` when nothing is read."""
        ...


class RapidOCREngine:
    """PP-OCRv4 detection + recognition through ``rapidocr_onnxruntime`` (CPU, offline).

    Three departures from RapidOCR's defaults, all measured on 64×64 renders (numbers in
    :mod:`opd.bench_rewards`): the detector runs at the image's own resolution
    (``det_limit_type="max"``, PaddleOCR's default) instead of first upscaling every image to a
    736-px short side, ~8× slower for no gain; the text-direction classifier is off (Flow-GRPO calls
    PaddleOCR with ``cls=False``; generated signs are upright); and onnxruntime uses one thread per
    model, as small images parallelise better across images (threads of :class:`OCRReward`) than
    inside one.

    Each thread that reads gets its own RapidOCR instance: its detector keeps per-call state
    (``text_det.preprocess_op``), so one instance is not safe to share between threads.

    Args:
        text_score: lines recognised with a lower confidence are dropped (PaddleOCR's
            ``drop_score`` default, 0.5).
        num_threads: onnxruntime intra-op threads per model; ``-1`` → onnxruntime's default
            (all cores).
    """

    def __init__(self, text_score: float = 0.5, num_threads: int = 1) -> None:
        self.text_score = text_score
        self.num_threads = num_threads
        self._local = threading.local()
        self._ocr()  # build now: a missing or broken install fails here, not mid-training

    def _ocr(self) -> Any:
        if not hasattr(self._local, "ocr"):
            self._local.ocr = _build_rapidocr(self.text_score, self.num_threads)
        return self._local.ocr

    def read(self, image: np.ndarray) -> list[tuple[str, float]]:
        # RapidOCR takes a 3-channel ndarray as BGR (OpenCV order) without converting it.
        result, _ = self._ocr()(np.ascontiguousarray(image[..., ::-1]), use_cls=False)
        if not result:  # None when no text box is found or every line is below text_score
            return []
        return [(str(text), float(conf)) for _box, text, conf in result]


def _build_rapidocr(text_score: float, num_threads: int) -> Any:
    """A RapidOCR instance, or an error that says how to fix the install."""
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError as err:
        raise ImportError(
            "OCRReward(engine='rapidocr') needs the `rapidocr-onnxruntime` package: "
            "pip install rapidocr-onnxruntime (or run `make install`)"
        ) from err
    try:
        return RapidOCR(
            text_score=text_score,
            det_limit_type="max",
            use_cls=False,
            intra_op_num_threads=num_threads,
        )
    except Exception as err:  # broken wheel, missing model files, onnxruntime mismatch
        raise RuntimeError(
            f"could not construct the RapidOCR engine ({err!r}); reinstall rapidocr-onnxruntime"
        ) from err


#: EasyOCR's files for English (``Reader(["en"])``): the CRAFT detector and the generation-2
#: recogniser, each published as a zip holding the ``.pth``
EASYOCR_FILES = {
    "craft_mlt_25k.pth": "https://github.com/JaidedAI/EasyOCR/releases/download/pre-v1.1.6/craft_mlt_25k.zip",
    "english_g2.pth": "https://github.com/JaidedAI/EasyOCR/releases/download/v1.3/english_g2.zip",
}


class EasyOCREngine:
    """EasyOCR (CRAFT detection + CRNN recognition) with downloads disabled.

    Reads as ``Reader.readtext`` does on an image *file*: detection on the RGB image, recognition
    on its grey version (OpenCV's RGB→grey, as ``cv2.imread(..., IMREAD_GRAYSCALE)``). Calling
    ``readtext`` on an array instead would convert with BGR weights, so the two steps are called
    here directly. Reads are serialised by a lock (one model instance shared by the reward's
    threads).

    Args:
        model_dir: EasyOCR's ``model_storage_directory``: a folder holding ``craft_mlt_25k.pth``
            and ``english_g2.pth`` (:data:`EASYOCR_FILES`), relative to ``weights_dir`` unless
            absolute.
        languages: EasyOCR language codes.
        gpu: run on CUDA; ``None`` → when available.
        weights_dir: the weights folder (``paths.weights_dir``); ``None`` → ``$OPD_WEIGHTS_DIR``.

    Raises:
        MissingWeightsError: the folder or a file in it is missing (or corrupt: EasyOCR checks MD5s).
    """

    def __init__(self, model_dir: str = "easyocr", languages: Sequence[str] = ("en",), gpu: bool | None = None,
                 weights_dir: str | os.PathLike | None = None) -> None:
        hint = "; ".join(f"{name} from {url}" for name, url in EASYOCR_FILES.items())
        try:
            path = resolve_weights(model_dir, what="OCRReward(engine='easyocr')", root=weights_dir)
        except MissingWeightsError as err:
            raise MissingWeightsError(f"{err} EasyOCR's English files (unzip each): {hint}") from None
        try:
            import easyocr
        except ImportError as err:
            raise ImportError("OCRReward(engine='easyocr') needs the `easyocr` package: pip install --no-deps easyocr "
                              "(its own requirements are in opd's `real` extra; without --no-deps it adds a second "
                              "OpenCV), or run `make install`") from err
        try:
            reader = easyocr.Reader(list(languages), gpu=torch.cuda.is_available() if gpu is None else gpu,
                                    model_storage_directory=str(path), download_enabled=False, verbose=False)
        except FileNotFoundError as err:  # EasyOCR: "Missing <file>" / "MD5 mismatch for <file>"
            raise MissingWeightsError(
                f"OCRReward(engine='easyocr'): {err} (in {path}). Put EasyOCR's files there (unzip each): {hint}; "
                f"opd never lets EasyOCR download them."
            ) from None
        self._setup(reader)

    @classmethod
    def from_reader(cls, reader: Any) -> EasyOCREngine:
        """An engine around an already-built ``easyocr.Reader`` (or a stand-in with ``detect`` and
        ``recognize``; tests)."""
        self = cls.__new__(cls)
        self._setup(reader)
        return self

    def _setup(self, reader: Any) -> None:
        self.reader = reader
        self._lock = threading.Lock()

    def read(self, image: np.ndarray) -> list[tuple[str, float]]:
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        with self._lock:
            horizontal, free = self.reader.detect(image)
            result = self.reader.recognize(grey, horizontal[0], free[0], detail=1)
        return [(str(text), float(conf)) for _box, text, conf in result]


#: engine name (``OCRReward(engine=...)``) → factory taking the ``engine_kwargs``
ENGINES: dict[str, Callable[..., OCREngine]] = {"rapidocr": RapidOCREngine, "easyocr": EasyOCREngine}


def prepare_for_ocr(image: np.ndarray, pad: int, upscale_to: int | None) -> np.ndarray:
    """Pad ``uint8 [H, W, 3]`` by ``pad`` px of replicated border, then upscale (bicubic) so the
    short side is at least ``upscale_to``; never downscales.

    The border keeps glyphs touching the canvas edge detectable; replicating the edge (not painting
    white) keeps coloured sign backgrounds uniform.
    """
    if pad > 0:
        image = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    h, w = image.shape[:2]
    if upscale_to is not None and min(h, w) < upscale_to:
        scale = upscale_to / min(h, w)
        image = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_CUBIC)
    return image


class OCRReward(Reward):
    """Edit-distance accuracy of the target text read back by OCR (Flow-GRPO's OCR reward).

    The target is ``metadata[i]["text"]`` when present, else the text inside the first pair of
    double quotes of ``prompts[i]``.

    Args:
        engine: key of :data:`ENGINES` (``"rapidocr"``, ``"easyocr"``).
        pad: border (px, at the input resolution) added before OCR; see :func:`prepare_for_ocr`.
        upscale_to: minimum short side (px) of the padded image given to the engine; ``None``
            keeps the input resolution. A floor for renders smaller than 64 px (a no-op at 64 px
            with the default pad): upscaling 64-px renders further made RapidOCR read blurred,
            noisy ones worse (numbers in :mod:`opd.bench_rewards`).
        num_workers: threads reading images in parallel (each with its own engine); 2 with one
            onnxruntime thread each read 64×64 signs ~2× faster than one call at a time on 2 cores.
        engine_kwargs: passed to the engine's constructor (e.g. ``{"text_score": 0.5}``).

    ``score`` returns ``{"reward": accuracy in [0, 1], "exact": 1.0 if the normalised recognised
    text equals the target else 0.0, "failed": 1.0 where the OCR engine raised (reward and exact are
    0 there) else 0.0}``, each ``float32 [B]`` on CPU. Failures are counted (``num_failed`` of
    ``num_read`` images so far) and every batch with one says so in a ``RuntimeWarning`` carrying the
    running count, so repeated failures are never swallowed by the warnings filter.
    """

    name = "ocr"

    def __init__(
        self,
        engine: str = "rapidocr",
        pad: int = 8,
        upscale_to: int | None = 64,
        num_workers: int = 2,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if engine not in ENGINES:
            raise ValueError(f"OCRReward: unknown engine={engine!r}; choose one of {sorted(ENGINES)}")
        self.engine: OCREngine = ENGINES[engine](**(engine_kwargs or {}))
        self.pad = pad
        self.upscale_to = upscale_to
        self.num_workers = num_workers
        self._pool: ThreadPoolExecutor | None = None  # created on first use, reused across batches
        self.num_read = 0    # images given to the engine so far
        self.num_failed = 0  # of which the engine raised on
        self._count_lock = threading.Lock()

    def read(self, image: np.ndarray) -> str:
        """``uint8 [H, W, 3]`` RGB → recognised text (lines with confidence > 0, joined with
        nothing, as the references do)."""
        lines = self.engine.read(prepare_for_ocr(image, self.pad, self.upscale_to))
        return "".join(text for text, conf in lines if conf > 0)

    def _read_or_error(self, image: np.ndarray) -> tuple[str, Exception | None]:
        try:
            return self.read(image), None
        except Exception as err:  # noqa: BLE001 — one unreadable image must not stop a training step
            return "", err

    def read_all_checked(self, images: list[np.ndarray]) -> tuple[list[str], list[bool]]:
        """``(texts, failed)``: the recognised text of each ``uint8 [H, W, 3]`` image, in order (``""``
        where the engine raised), and whether it raised. Counts into ``num_read``/``num_failed`` and
        warns once per batch with failures (naming the images, the first error and the running count)."""
        if self.num_workers <= 1 or len(images) <= 1:
            results = [self._read_or_error(image) for image in images]
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="ocr")
            results = list(self._pool.map(self._read_or_error, images))
        failed = [err is not None for _, err in results]
        bad = [i for i, f in enumerate(failed) if f]
        with self._count_lock:
            self.num_read += len(images)
            self.num_failed += len(bad)
            total = (self.num_failed, self.num_read)
        if bad:
            first = results[bad[0]][1]
            shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
            warnings.warn(
                f"OCRReward: the OCR engine raised on {len(bad)} of {len(images)} image(s) of this batch "
                f"(image{'s' if len(bad) > 1 else ''} {shown}; first error {first!r}); they score 0 with failed=1 "
                f"({total[0]} of {total[1]} images failed so far)", RuntimeWarning, stacklevel=2,
            )
        return [text for text, _ in results], failed

    def read_all(self, images: list[np.ndarray]) -> list[str]:
        """Recognised text of each ``uint8 [H, W, 3]`` image, in order; ``""`` where the engine failed."""
        return self.read_all_checked(images)[0]

    def score(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> dict[str, Tensor]:
        """``images [B, 3, H, W]`` in [0, 1] → ``{"reward": [B], "exact": [B], "failed": [B]}``."""
        check_batch(images, prompts, metadata)
        targets = [_target(prompt, meta) for prompt, meta in zip(prompts, metadata)]
        recognised, failed = self.read_all_checked(to_uint8_hwc(images))
        reward = [0.0 if bad else ocr_accuracy(target, text) for target, text, bad in zip(targets, recognised, failed)]
        exact = [0.0 if bad else float(exact_match(target, text))
                 for target, text, bad in zip(targets, recognised, failed)]
        return {
            "reward": torch.tensor(reward, dtype=torch.float32),
            "exact": torch.tensor(exact, dtype=torch.float32),
            "failed": torch.tensor(failed, dtype=torch.float32),
        }


    def score_matrix(self, images: Tensor, metadata: list[dict[str, Any]], batch_size: int = 64
                     ) -> dict[str, Tensor]:
        """Every image against every row (prompt ``row["prompt"]``): ``{"reward", "exact", "failed"}``,
        each ``float32 [N, M]`` (``failed`` is the image's, on every row; its scores are 0). Each image
        is read once; each distinct (recognised text, target) pair is compared once. ``batch_size`` is
        unused (one read per image whatever the batch)."""
        check_batch(images, [""] * images.shape[0], [{}] * images.shape[0])
        targets = [_target(row["prompt"], row) for row in metadata]
        recognised, failed = self.read_all_checked(to_uint8_hwc(images))
        texts, text_of = np.unique(np.array(recognised, dtype=object), return_inverse=True)
        goals, goal_of = np.unique(np.array(targets, dtype=object), return_inverse=True)
        accuracy = np.array([[ocr_accuracy(g, t) for g in goals] for t in texts], dtype=np.float32).reshape(
            len(texts), len(goals))
        exact = np.array([[float(exact_match(g, t)) for g in goals] for t in texts], dtype=np.float32).reshape(
            len(texts), len(goals))
        rows, cols = np.ix_(text_of.reshape(-1), goal_of.reshape(-1))
        bad = torch.tensor(failed, dtype=torch.float32)[:, None].expand(len(recognised), len(targets))
        ok = 1.0 - bad  # an image the engine raised on scores 0 (as "" would against a non-empty target)
        return {"reward": torch.from_numpy(accuracy[rows, cols]) * ok, "exact": torch.from_numpy(exact[rows, cols]) * ok,
                "failed": bad.contiguous()}


def _target(prompt: str, meta: dict[str, Any]) -> str:
    """The text an image should show: ``meta["text"]``, else the prompt's first quoted span."""
    target = meta.get("text", quoted_text(prompt))
    if not target:
        raise ValueError(
            f"OCRReward: no target text for prompt {prompt!r}: put it in double quotes in the prompt "
            'or in metadata["text"]'
        )
    return target
