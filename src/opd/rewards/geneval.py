"""GenEval on real images: a COCO instance segmenter and CLIP colours under GenEval's own rules.

``score`` → ``{"reward": Flow-GRPO's partial score, "correct": GenEval's strict 0/1}`` per image;
the evaluation report averages ``correct`` per tag and over tags (GenEval's overall score). The
decisions themselves live in :mod:`opd.rewards.geneval_rules`; this module only turns images into
:class:`~opd.rewards.geneval_rules.Detection` lists.

**Detector: Mask2Former, Swin-S, COCO instance segmentation** (transformers,
``facebook/mask2former-swin-small-coco-instance``). GenEval's reference detector is exactly this
model (mmdetection's ``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco``), so GenEval's calibrated
thresholds (0.3, and 0.9 for counting) keep their meaning, and it yields the instance masks that
GenEval's colour step pastes onto grey. An open-vocabulary detector (OWLv2) scores on another scale
(typical confidences 0.1–0.5), so those thresholds would silently mean something else; DETR has no
masks. The pre/post-processing follows mmdetection's rather than transformers' helper (which
resizes masks through a fixed 384×384 grid): resize so the image fits 1333×800 keeping its aspect,
normalise, pad to a multiple of 32; then score = class probability × mean mask probability inside
the binarised mask, for the top 100 (query, class) pairs, boxes = the masks' tight boxes.

**Colours: CLIP ViT-L/14** (``openai/clip-vit-large-patch14``, the weights GenEval loads through
open_clip), zero-shot over GenEval's ten colours with its three templates
(``"a photo of a {c} {object}"``, ``"a photo of a {c}-colored {object}"``, ``"a photo of a {c} object"``;
per-template unit embeddings averaged and renormalised) on each object pasted by its mask onto
grey ``#999`` and cropped to its box, then CLIP's resize-224 (bicubic) / centre-crop / normalise.

Weights come from :func:`opd.rewards.weights.resolve_weights`: absent weights fail at
construction. ``random_weights_for_tests=True`` builds both networks from configs with random
weights instead (``random_size="tiny"``, run at 128 px, for fast tests; ``"full"`` for the real architectures):
the numbers then mean nothing, which the evaluation report states.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from opd.data.geneval_prompts import COCO_CLASSES
from opd.rewards.base import Reward, check_batch, to_uint8_hwc
from opd.rewards.geneval_rules import (
    COLORS,
    Detection,
    colour_queries,
    confidence_threshold,
    partial_score,
    select_objects,
    strict_correct,
)
from opd.rewards.weights import resolve_weights

log = logging.getLogger(__name__)

#: detector label names (detectron2 / VOC spellings) → GenEval's class names
LABEL_ALIASES = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard",
                 "motorbike": "motorcycle", "aeroplane": "airplane", "sofa": "couch", "pottedplant": "potted plant",
                 "diningtable": "dining table", "tvmonitor": "tv", "hair dryer": "hair drier", "doughnut": "donut"}
#: mmdetection's ImageNet normalisation (RGB, 0-255 units) and CLIP's (0-1 units)
_DET_MEAN, _DET_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
COLOR_TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")


def geneval_label_names(id2label: dict[int, str]) -> list[str | None]:
    """The detector's label ids → GenEval class names (``None`` for classes GenEval never asks)."""
    names = []
    for i in range(len(id2label)):
        name = id2label[i].lower().replace("_", " ").strip()
        name = LABEL_ALIASES.get(name, name)
        names.append(name if name in COCO_CLASSES else None)
    return names


class Mask2FormerDetector:
    """COCO instance segmentation → :class:`Detection` lists (see the module docstring)."""

    def __init__(self, model: Any, max_detections: int = 100, scale: tuple[int, int] = (1333, 800),
                 size_divisor: int = 32, min_score: float = 0.0) -> None:
        self.model = model.eval()
        self.labels = geneval_label_names(model.config.id2label)
        missing = sorted(set(COCO_CLASSES) - {n for n in self.labels if n})
        if missing:
            raise ValueError(f"GenEval detector: its labels do not cover the COCO classes (missing {missing[:5]}…): "
                             "use a COCO instance-segmentation checkpoint such as "
                             "facebook/mask2former-swin-small-coco-instance")
        self.max_detections, self.scale = max_detections, scale
        self.size_divisor, self.min_score = size_divisor, min_score

    def preprocess(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """``[B, 3, H, W]`` in [0, 1] → normalised, padded input and the resized (unpadded) size."""
        h, w = images.shape[-2:]
        factor = min(max(self.scale) / max(h, w), min(self.scale) / min(h, w))
        size = (int(h * factor + 0.5), int(w * factor + 0.5))
        x = F.interpolate(images * 255, size=size, mode="bilinear", align_corners=False)
        mean = torch.tensor(_DET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(_DET_STD, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
        pad_h, pad_w = (-size[0]) % self.size_divisor, (-size[1]) % self.size_divisor
        return F.pad(x, (0, pad_w, 0, pad_h)), size

    @torch.no_grad()
    def __call__(self, images: Tensor) -> list[list[Detection]]:
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        pixels, size = self.preprocess(images.to(device=device, dtype=torch.float32))
        out = self.model(pixel_values=pixels.to(dtype))
        return [self.postprocess(out.class_queries_logits[i].float(), out.masks_queries_logits[i].float(),
                                 pixels.shape[-2:], size, tuple(images.shape[-2:]))
                for i in range(images.shape[0])]

    def postprocess(self, class_logits: Tensor, mask_logits: Tensor, padded: tuple[int, int],
                    size: tuple[int, int], original: tuple[int, int]) -> list[Detection]:
        """One image's queries (``[Q, C + 1]`` logits, ``[Q, h, w]`` mask logits) → detections."""
        num_classes = class_logits.shape[-1] - 1
        probs = class_logits.softmax(-1)[:, :-1].flatten()
        top, index = probs.topk(min(self.max_detections, probs.numel()))
        queries, labels = index // num_classes, index % num_classes
        masks = F.interpolate(mask_logits[queries][None], size=tuple(padded), mode="bilinear", align_corners=False)
        masks = F.interpolate(masks[..., : size[0], : size[1]], size=original, mode="bilinear",
                              align_corners=False)[0]
        binary = masks > 0
        mask_scores = (masks.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
        scores = top * mask_scores
        found = []
        for k in torch.nonzero(scores > self.min_score).flatten().tolist():
            name = self.labels[int(labels[k])]
            if name is None or not binary[k].any():
                continue
            ys, xs = torch.nonzero(binary[k], as_tuple=True)
            box = (float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1)
            found.append(Detection(name, float(scores[k]), box, binary[k].cpu().numpy()))
        return found


class ClipColorClassifier:
    """GenEval's zero-shot colour classifier (see the module docstring)."""

    def __init__(self, model: Any, tokenizer: Any, background: tuple[int, int, int] = (153, 153, 153)) -> None:
        self.model, self.tokenizer, self.background = model.eval(), tokenizer, background
        self.size = int(model.config.vision_config.image_size)
        self._classifiers: dict[str, Tensor] = {}

    @torch.no_grad()
    def text_classifier(self, cls: str) -> Tensor:
        """``[D, 10]`` unit colour embeddings for objects of class ``cls`` (cached)."""
        if cls not in self._classifiers:
            device = next(self.model.parameters()).device
            columns = []
            for color in COLORS:
                texts = [t.format(c=color, cls=cls) for t in COLOR_TEMPLATES]
                tokens = self.tokenizer(texts, padding=True, return_tensors="pt").to(device)
                out = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
                emb = F.normalize(self.model.text_projection(out.pooler_output).float(), dim=-1).mean(0)
                columns.append(emb / emb.norm())
            self._classifiers[cls] = torch.stack(columns, dim=1)
        return self._classifiers[cls]

    def crop(self, image: np.ndarray, det: Detection) -> Tensor:
        """The object on grey, cropped to its box, as CLIP input ``[3, S, S]``."""
        pil = Image.fromarray(image)
        if det.mask is not None:
            pil = Image.composite(pil, Image.new("RGB", pil.size, self.background),
                                  Image.fromarray(det.mask.astype(np.uint8) * 255))
        pil = pil.crop(tuple(round(v) for v in det.box))
        w, h = pil.size
        short = min(w, h)
        pil = pil.resize((max(1, round(w * self.size / short)), max(1, round(h * self.size / short))),
                         Image.BICUBIC)
        w, h = pil.size
        left, top = round((w - self.size) / 2), round((h - self.size) / 2)
        pil = pil.crop((left, top, left + self.size, top + self.size))
        x = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255).permute(2, 0, 1)
        return (x - torch.tensor(_CLIP_MEAN).view(3, 1, 1)) / torch.tensor(_CLIP_STD).view(3, 1, 1)

    @torch.no_grad()
    def __call__(self, image: np.ndarray, detections: list[Detection], cls: str) -> list[str]:
        """Colour names of ``detections`` (objects of class ``cls``) in an ``[H, W, 3]`` uint8 image."""
        if not detections:
            return []
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        pixels = torch.stack([self.crop(image, d) for d in detections]).to(device=device, dtype=dtype)
        out = self.model.vision_model(pixel_values=pixels)
        feats = F.normalize(self.model.visual_projection(out.pooler_output).float(), dim=-1)
        return [COLORS[i] for i in (feats @ self.text_classifier(cls)).argmax(1).tolist()]


class GenEval(Reward):
    """GenEval with its official rules on a transformers Mask2Former and CLIP (module docstring).

    Images ``[B, 3, H, W]`` in [0, 1] with GenEval-schema metadata rows (``tag``, ``include``,
    ``exclude``) → ``{"reward": partial score, "correct": strict 0/1}``, ``float32 [B]`` on CPU.
    ``device=None`` scores on the images' device.
    """

    name = "geneval"

    def __init__(self, detector: str = "facebook/mask2former-swin-small-coco-instance",
                 clip: str = "openai/clip-vit-large-patch14", weights_dir: str | None = None,
                 device: str | None = None, batch_size: int = 8, threshold: float = 0.3,
                 counting_threshold: float = 0.9, max_objects: int = 16, nms_threshold: float = 1.0,
                 position_threshold: float = 0.1, max_detections: int = 100,
                 detector_scale: tuple[int, int] = (1333, 800), reference_quirk: bool = False,
                 random_weights_for_tests: bool = False, random_size: str = "tiny") -> None:
        if random_weights_for_tests:
            log.warning("GenEval reward: RANDOM weights (%s) — tests only, its numbers mean nothing", random_size)
            det_model, clip_model, tokenizer = random_networks(random_size)
        else:
            det_model, clip_model, tokenizer = load_networks(detector, clip, weights_dir)
        if random_weights_for_tests and random_size == "tiny":
            detector_scale = (128, 128)  # the tiny stand-in runs at 128 px: fast tests
        self.detector = Mask2FormerDetector(det_model, max_detections, tuple(detector_scale),
                                            min_score=min(threshold, counting_threshold))
        self.colors = ClipColorClassifier(clip_model, tokenizer)
        self.networks = (det_model.eval().requires_grad_(False), clip_model.eval().requires_grad_(False))
        self.random_weights = self.stand_in = random_weights_for_tests
        self.device = torch.device(device) if device else None
        self.batch_size = batch_size
        self.thresholds = (threshold, counting_threshold)
        self.max_objects, self.nms_threshold = max_objects, nms_threshold
        self.position_threshold, self.reference_quirk = position_threshold, reference_quirk

    def judge(self, image: np.ndarray, detections: list[Detection], meta: dict[str, Any]) -> tuple[float, float]:
        """One image's ``(partial score, strict 0/1)`` from its raw detections."""
        objects = select_objects(detections, confidence_threshold(meta, *self.thresholds), self.max_objects,
                                 self.nms_threshold)
        for cls, n in colour_queries(objects, meta):
            top = objects[cls][:n]
            objects[cls][:n] = [replace(d, color=c) for d, c in zip(top, self.colors(image, top, cls))]
        return (partial_score(objects, meta, self.position_threshold, self.reference_quirk),
                float(strict_correct(objects, meta, self.position_threshold)))

    def score(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> dict[str, Tensor]:
        check_batch(images, prompts, metadata)
        for i, meta in enumerate(metadata):
            if "include" not in meta:
                raise ValueError(f"GenEval: metadata[{i}] (prompt {prompts[i]!r}) has no 'include' key; it needs "
                                 "GenEval-schema rows such as data/geneval/evaluation_metadata.jsonl")
        device = self.device or images.device
        for net in self.networks:
            net.to(device)
        # the references judge saved 8-bit images: detect and crop on those pixels
        pixels = to_uint8_hwc(images)
        reward, correct = [], []
        for start in range(0, len(prompts), self.batch_size):
            chunk = torch.from_numpy(np.stack(pixels[start : start + self.batch_size])).permute(0, 3, 1, 2)
            detections = self.detector(chunk.to(device).float() / 255)
            for k, dets in enumerate(detections):
                partial, strict = self.judge(pixels[start + k], dets, metadata[start + k])
                reward.append(partial)
                correct.append(strict)
        return {"reward": torch.tensor(reward, dtype=torch.float32),
                "correct": torch.tensor(correct, dtype=torch.float32)}


def load_networks(detector: str, clip: str, weights_dir: str | None) -> tuple[Any, Any, Any]:
    """The real Mask2Former, CLIP and CLIP tokenizer (float32); absent weights raise MissingWeightsError."""
    det_path = resolve_weights(detector, what="GenEval reward (Mask2Former COCO detector)", root=weights_dir)
    clip_path = resolve_weights(clip, what="GenEval reward (CLIP ViT-L/14 colour classifier)", root=weights_dir)
    from transformers import CLIPModel, CLIPTokenizer, Mask2FormerForUniversalSegmentation

    det_model = Mask2FormerForUniversalSegmentation.from_pretrained(str(det_path))
    return det_model, CLIPModel.from_pretrained(str(clip_path)), CLIPTokenizer.from_pretrained(str(clip_path))


def random_networks(size: str = "tiny", seed: int = 0) -> tuple[Any, Any, Any]:
    """Randomly initialised stand-ins built from configs: ``"tiny"`` (fast tests) or ``"full"``
    (Swin-S Mask2Former and CLIP ViT-L/14 shapes). Tests only."""
    import tempfile
    from pathlib import Path

    from transformers import (
        CLIPConfig,
        CLIPModel,
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        SwinConfig,
    )

    from opd.models.random_sd3 import _byte_vocab_tokenizer

    if size not in ("tiny", "full"):
        raise ValueError(f"GenEval: random_size={size!r}; choose 'tiny' or 'full'")
    torch.manual_seed(seed)
    stages = ["stage1", "stage2", "stage3", "stage4"]
    id2label = dict(enumerate(COCO_CLASSES))
    if size == "tiny":
        swin = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
                          out_features=stages)
        det_cfg = Mask2FormerConfig(backbone_config=swin, feature_size=32, mask_feature_size=32, hidden_dim=32,
                                    encoder_feedforward_dim=64, dim_feedforward=64, encoder_layers=1,
                                    decoder_layers=2, num_attention_heads=2, num_queries=10, id2label=id2label,
                                    use_pretrained_backbone=False)
        text = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
        vision = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
                  "image_size": 224, "patch_size": 14}
        projection = 16
    else:
        swin = SwinConfig(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24], window_size=7,
                          out_features=stages)
        det_cfg = Mask2FormerConfig(backbone_config=swin, id2label=id2label, use_pretrained_backbone=False)
        text = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12}
        vision = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
                  "image_size": 224, "patch_size": 14}
        projection = 768
    clip_cfg = CLIPConfig(text_config=dict(text, vocab_size=520, max_position_embeddings=77, bos_token_id=0,
                                           eos_token_id=2, pad_token_id=1),
                          vision_config=vision, projection_dim=projection)
    tokenizer = _byte_vocab_tokenizer(Path(tempfile.mkdtemp(prefix="opd_geneval_tok_")))
    return Mask2FormerForUniversalSegmentation(det_cfg), CLIPModel(clip_cfg), tokenizer
