"""What every training module shares for trustworthy runs: a non-finite guard before each optimiser
step and each checkpoint or export write, and random-number states that travel in checkpoints.

Non-finite values are *noted* where they appear (``note_nonfinite``: a teacher's targets, a loss
term, a reward) and the run stops at the next optimiser step (``raise_if_nonfinite``), before the
weights change. The decision is gathered over ranks, so under DDP every rank stops together instead
of one rank raising while the others wait in a collective. Checkpoints are scanned before they are
written (weights, optimiser states, callback states such as the EMA shadow): a non-finite value is
never saved. On load, a checkpoint holding non-finite values is refused.

RNG: each checkpoint stores the Python, NumPy, torch CPU and CUDA generator states of every rank;
a resumed run restores them just before its first training batch, so draws from the global
generators (e.g. pre-training's σ, noise and caption dropout) continue as if never interrupted.
"""
from __future__ import annotations

import hashlib
import logging
import math
import random
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """A value that feeds an optimiser step or a saved file is NaN or infinite."""


def describe(value: Any) -> str:
    """A short description of a non-finite value: ``nan``, or ``3 of 64 values non-finite (nan, inf)``."""
    if isinstance(value, Tensor):
        t = value.detach()
        if t.numel() == 1:
            return str(t.float().item())
        bad = ~torch.isfinite(t)
        kinds = sorted({"nan" if torch.isnan(t).any() else "", "inf" if torch.isinf(t).any() else ""} - {""})
        return f"{int(bad.sum())} of {t.numel()} values non-finite ({', '.join(kinds)})"
    return str(value)


def is_finite(value: Any) -> bool:
    """True for finite floats and for tensors whose every element is finite (integer tensors are)."""
    if isinstance(value, Tensor):
        if hasattr(value, "to_local"):  # a DTensor: this rank's shard
            value = value.to_local()
        if not (value.is_floating_point() or value.is_complex()) or value.numel() == 0:
            return True
        return bool(torch.isfinite(value.detach()).all())
    if isinstance(value, float):
        return math.isfinite(value)
    return True


def nonfinite_entries(tree: Any, prefix: str = "", limit: int = 8) -> list[str]:
    """Paths (``state_dict/<key>``, ``optimizer_states/0/state/3/exp_avg`` ...) of non-finite tensors
    and floats in a nested checkpoint-like structure; at most ``limit`` of them."""
    out: list[str] = []

    def visit(node: Any, path: str) -> None:
        if len(out) >= limit:
            return
        if isinstance(node, dict):
            for k, v in node.items():
                visit(v, f"{path}/{k}" if path else str(k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                visit(v, f"{path}/{i}" if path else str(i))
        elif not is_finite(node):
            out.append(f"{path} ({describe(node)})")

    visit(tree, prefix)
    return out


def checkpoint_payload(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """What of a checkpoint must be finite: weights, optimiser states, callback states (the EMA
    shadow; not ModelCheckpoint's bookkeeping, whose "k-th best" starts at inf) and the modules'
    own ``opd_*`` entries (RNG states excluded)."""
    callbacks = {k: v for k, v in (checkpoint.get("callbacks") or {}).items() if not str(k).startswith("ModelCheckpoint")}
    return {"state_dict": checkpoint.get("state_dict", {}), "optimizer_states": checkpoint.get("optimizer_states", []),
            "callbacks": callbacks, **{k: v for k, v in checkpoint.items() if k.startswith("opd_") and k != "opd_rng"}}


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (a teacher adapter's identity for honest resumes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- random-number states -------------------------------------------------------------------------
def rng_states() -> dict[str, Any]:
    """This process's global generator states (CUDA: every device, when CUDA is initialised)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {"python": random.getstate(),  # plain ints, tensors: weights-only loadable
                              "numpy": (str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                                        float(cached)),
                              "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        cuda = states["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning("checkpoint holds CUDA generator states of %d devices, this process sees %d: CUDA "
                        "draws will differ from the interrupted run", len(cuda), torch.cuda.device_count())


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gathered_rng_states() -> list[dict[str, Any]]:
    """Every rank's generator states, indexed by rank (a collective under DDP: call on all ranks)."""
    _, world = _world()
    if world == 1:
        return [rng_states()]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, rng_states())
    return out


class GuardedModule(pl.LightningModule):
    """Mixin base of the training modules: the non-finite guard and resumable RNG states.

    Subclasses add their own checkpoint keys *before* calling ``super().on_save_checkpoint`` so that
    the scan here sees the finished checkpoint."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._nonfinite: list[str] = []
        self._pending_rng: dict[str, Any] | None = None

    # -- the step guard ---------------------------------------------------------------------------
    def note_nonfinite(self, label: str, value: Any) -> bool:
        """Remember ``label`` if ``value`` is not finite (the run stops at the next optimiser step).
        Returns whether it was finite."""
        if is_finite(value):
            return True
        self._nonfinite.append(f"{label} = {describe(value)}")
        return False

    def note_loss(self, label: str, loss: Tensor, terms: dict[str, Any] | None = None) -> bool:
        """``note_nonfinite`` for a loss, naming its non-finite terms (``terms``: its metrics)."""
        if is_finite(loss):
            return True
        bad = [k for k, v in (terms or {}).items() if not is_finite(v)]
        return self.note_nonfinite(label + (f" (non-finite terms: {', '.join(bad)})" if bad else ""), loss)

    def _any_rank(self, flag: bool) -> bool:
        if self._trainer is None or self.trainer.world_size == 1:
            return flag
        return bool(self.trainer.strategy.reduce_boolean_decision(flag, all=False))

    def raise_if_nonfinite(self, what: str = "the optimiser step") -> None:
        """Stop the run (all ranks together) if anything non-finite was noted since the last step."""
        mine, self._nonfinite = self._nonfinite, []
        if not self._any_rank(bool(mine)):
            return
        where = self.progress_label()
        unique = list(dict.fromkeys(mine))
        found = "; ".join(unique[:6]) + (f"; and {len(unique) - 6} more" if len(unique) > 6 else "") if unique \
            else "another rank saw non-finite values (see its log)"
        raise NonFiniteError(f"non-finite values before {what} ({where}): {found}. Nothing was stepped or saved; "
                             "the last checkpoint (if any) holds the last finite weights")

    def progress_label(self) -> str:
        return f"step {self.global_step}" if self._trainer is not None else "outside a trainer"

    # -- checkpoints --------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["opd_rng"] = gathered_rng_states()
        bad = nonfinite_entries(checkpoint_payload(checkpoint))
        if self._any_rank(bool(bad)):
            raise NonFiniteError(f"refusing to write a checkpoint at {self.progress_label()}: non-finite values in "
                                 f"{', '.join(bad) or 'another rank’s shard'}; nothing was saved")

    def checkpoint_source(self) -> str:
        """The path of the checkpoint being loaded, for messages (empty outside a trainer)."""
        return (getattr(self._trainer, "ckpt_path", None) or "") if self._trainer is not None else ""

    def check_checkpoint_shapes(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint whose weights have other shapes than this run's model (a resume with
        another LoRA rank or model size), naming the difference, before the state dict load's wall of
        "size mismatch" lines. (Under FSDP the parameters are flat shards; Lightning's own load checks.)"""
        from lightning.pytorch.strategies import FSDPStrategy

        if self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy):
            return
        own = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        bad = [(k, tuple(v.shape), own[k]) for k, v in checkpoint.get("state_dict", {}).items()
               if k in own and tuple(v.shape) != own[k]]
        if not bad:
            return
        ranks = []  # a LoRA's rank is the first dimension of its A matrices
        for name in sorted({m.group(1) for k, _, _ in bad if (m := re.search(r"\.lora_A\.([^.]+)\.", k))}):
            ckpt, now = next((c, n) for k, c, n in bad if f".lora_A.{name}." in k)
            ranks.append(f"LoRA '{name}': rank {ckpt[0]} in the checkpoint, {now[0]} in this run")
        key, ckpt, now = bad[0]
        raise ValueError(f"checkpoint {self.checkpoint_source()} does not fit this run's model: {len(bad)} tensor(s) differ in "
                         f"shape{' (' + '; '.join(ranks) + ')' if ranks else ''}, e.g. {key}: {list(ckpt)} in the "
                         f"checkpoint, {list(now)} now. Resume with the settings it was trained with (module.lora.*, "
                         "model.*), or start a new run folder (hydra.run.dir=...)")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_checkpoint_shapes(checkpoint)
        bad = nonfinite_entries(checkpoint_payload(checkpoint))
        if bad:
            raise NonFiniteError(f"checkpoint {self.checkpoint_source()} holds non-finite values ({', '.join(bad)}); it was "
                                 "written before the non-finite guard existed: resume from an earlier checkpoint")
        states = checkpoint.get("opd_rng")
        if states is None:
            log.warning("checkpoint holds no random-number states (written by an older version): the resumed "
                        "run's global random draws will differ from an uninterrupted run's")
            return
        rank, world = _world()
        if len(states) != world:
            log.warning("checkpoint holds the random-number states of %d ranks, this run has %d: global random "
                        "draws will differ from an uninterrupted run's", len(states), world)
            return
        self._pending_rng = states[rank]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Restore the checkpoint's generator states right before the first resumed batch (after the
        data loader and the callbacks' start hooks, which draw from them in a fresh run too)."""
        if self._pending_rng is not None:
            set_rng_states(self._pending_rng)
            self._pending_rng = None

    def check_export(self, tensors: Iterable[tuple[str, Tensor]], what: str) -> None:
        """Refuse to write ``what`` (an adapter or model export) holding non-finite weights."""
        bad = [f"{name} ({describe(t)})" for name, t in tensors if not is_finite(t)]
        if bad:
            raise NonFiniteError(f"refusing to write {what}: non-finite weights in {', '.join(bad[:8])}")
