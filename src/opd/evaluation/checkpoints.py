"""What to evaluate: ``checkpoints.<name>`` = an adapter path, ``null`` (the base model), or
``{adapter: <path or null>, guidance_scale: <float>}`` when a checkpoint samples with its own CFG
(e.g. the GenEval teacher, trained and evaluated at CFG 1.0)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_KEYS = {"adapter", "guidance_scale"}
#: results.json's row of the cover images (:mod:`opd.evaluation.report`), never a checkpoint's name
RESERVED = "cover"


@dataclass(frozen=True)
class Checkpoint:
    """A named model to evaluate: the base (``adapter=None``) or a LoRA adapter on it."""

    name: str
    adapter: str | None
    guidance_scale: float


def parse_checkpoints(spec: Mapping[str, Any], guidance_scale: float) -> list[Checkpoint]:
    """``cfg.checkpoints`` (a plain dict) → checkpoints; ``guidance_scale`` is the default CFG."""
    if not spec:
        raise ValueError("checkpoints is empty: name at least one, e.g. checkpoints.base=null")
    out = []
    for name, value in spec.items():
        if name == RESERVED:
            raise ValueError(f"checkpoints.{RESERVED}: the name is reserved for the cover-image control; rename it")
        if value is None or isinstance(value, (str, Path)):
            out.append(Checkpoint(name, None if value is None else str(value), float(guidance_scale)))
        elif isinstance(value, Mapping):
            unknown = set(value) - _KEYS
            if unknown:
                raise ValueError(f"checkpoints.{name}: unknown key(s) {sorted(unknown)}; write an adapter path, "
                                 "null, or {adapter: <path or null>, guidance_scale: <float>}")
            adapter = value.get("adapter")
            out.append(Checkpoint(name, None if adapter is None else str(adapter),
                                  float(value.get("guidance_scale", guidance_scale))))
        else:
            raise ValueError(f"checkpoints.{name}={value!r}: write an adapter path, null, or "
                             "{adapter: <path or null>, guidance_scale: <float>}")
    return out
