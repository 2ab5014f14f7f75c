"""The base of every module that trains a LoRA policy on a frozen backbone with rollouts of its
own (teacher RL, DiffusionOPD): model set-up, prompt-embedding cache, round-seeded rollouts,
optimiser stepping with clipping, previews, adapter export and checkpoints that hold the adapters
only. Every optimiser step, checkpoint and export passes the non-finite guard
(:class:`opd.modules.guards.GuardedModule`); a reward that reports ``failed`` on every image of a
round stops the run.

Subclasses implement :meth:`AdapterPolicy.run_round` (one ``training_step`` = one round, manual
optimisation). Rollout noise is a pure function of ``(seed, round, rank, purpose)``, so a resumed
run continues exactly as an uninterrupted one would.

Precision (docs/precision.md): the student LoRA is fp32 whatever the backbone's dtype (the frozen
base and the teachers keep it), so its gradients, its AdamW state, its checkpoints and its exported
adapter are fp32; on a bf16/fp16 backbone every transformer forward runs under autocast in that
dtype. An fp16 backbone trains with Lightning's loss scaling (``trainer.precision=16-mixed``): the
gradients are unscaled before clipping, and a step whose gradients overflowed is skipped, as
``GradScaler`` does, without tripping the non-finite guard.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from opd.data.prompts import ticks_loader
from opd.models.backbone import Backbone, PromptEmbeds
from opd.models.lora import (
    DEFAULT_TARGETS,
    active_adapter,
    add_lora,
    copy_lora,
    lora_dtypes,
    lora_parameters,
    resolve_lora_file,
    save_lora,
    set_trainable,
)
from opd.modules.base import BackboneModule
from opd.modules.compute import ComputeMeter
from opd.modules.guards import NonFiniteError, is_finite
from opd.sampling import Trajectory, guided_velocity, rollout, sd3_sigmas
from opd.utils.seeds import ROLLOUT, stream_seed


class RewardFailedError(RuntimeError):
    """A reward could not score any image of a round (its ``failed`` key is 1 everywhere)."""


class AdapterPolicy(BackboneModule):
    """A trainable ``student`` LoRA on a frozen backbone (manual optimisation)."""

    STUDENT = "student"
    EMBED_CACHE_SIZE = 1024
    #: the student's parameter dtype (weights, gradients, AdamW state), whatever the backbone's
    TRAINABLE_DTYPE = torch.float32

    def __init__(self, backbone: Callable[[], Backbone], sampler: Any,
                 optimizer: Callable[..., torch.optim.Optimizer], lora: dict[str, Any] | None = None,
                 grad_clip: float | None = 1.0, seed: int = 0, preview_prompts: Sequence[str] = (),
                 init_adapter: str | None = None) -> None:
        super().__init__(backbone, sampler, optimizer, preview_prompts)
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold the adapters only, not the frozen backbone
        self.lora = {"rank": 32, "alpha": 64, "target_modules": list(DEFAULT_TARGETS), **(lora or {})}
        self.grad_clip = math.inf if grad_clip is None else grad_clip  # null: no clipping (the norm is still logged)
        self.seed = seed
        self.init_adapter = init_adapter
        if init_adapter is not None:
            resolve_lora_file(init_adapter)  # a wrong path fails now, before the backbone loads
        self.round = 0
        self.elapsed_minutes = 0.0
        self.last_metrics: dict[str, float] = {}  # this round's metrics (curve plots read them)
        self._embed_cache: dict[str, PromptEmbeds] = {}
        self._scaled_norm: Tensor | None = None  # fp16 loss scaling: the norm of the step in progress
        self._skipped_steps = 0  # fp16 loss scaling: steps of this round the scaler skipped
        self.compute = ComputeMeter()  # images sampled, transformer passes, model FLOPs (compute/... in the log)

    # -- set-up ----------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.backbone is not None:
            return
        super().configure_model()
        self.backbone.requires_grad_(False)
        add_lora(self.backbone.transformer, self.STUDENT, dtype=self.TRAINABLE_DTYPE, **self.lora)
        if self.init_adapter is not None:
            copy_lora(self.backbone.transformer, self.init_adapter, self.STUDENT)
            bad = [n for n, p in self.backbone.transformer.named_parameters()
                   if f".{self.STUDENT}." in n and not torch.isfinite(p).all()]
            if bad:
                raise NonFiniteError(f"module.init_adapter={self.init_adapter} holds non-finite weights "
                                     f"({', '.join(bad[:4])}); start from a finite adapter")
        set_trainable(self.backbone.transformer, self.STUDENT)

    def policy_parameters(self) -> list[torch.nn.Parameter]:
        return lora_parameters(self.backbone.transformer, self.STUDENT)

    def ema_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.backbone.transformer.named_parameters() if f".{self.STUDENT}." in n}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self._optimizer(self.policy_parameters())

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return ticks_loader()

    def encode(self, prompts: list[str]) -> PromptEmbeds:
        """Prompt embeddings, cached (the backbone's text encoders are frozen here).

        Each prompt is encoded on its own: batched kernels may round differently with the batch, and
        a prompt's embedding must not depend on which prompts missed the cache with it, or a resumed
        run (whose cache starts empty) drifts from an uninterrupted one."""
        missing = sorted({p for p in prompts if p not in self._embed_cache})
        if len(self._embed_cache) + len(missing) > self.EMBED_CACHE_SIZE:  # SD3: ~2.7 MB a prompt on the GPU
            self._embed_cache.clear()  # start over with this call's prompts only
            missing = sorted(set(prompts))
        with torch.no_grad():
            for p in missing:
                self._embed_cache[p] = self.backbone.encode_prompts([p])
        return PromptEmbeds.cat([self._embed_cache[p] for p in prompts])

    def velocity_under(self, adapter: str | None, x: Tensor, sigma: Tensor | float, cond: PromptEmbeds,
                       guidance_scale: float) -> Tensor:
        """The guided velocity with ``adapter`` active (``None``: adapters off = reference model).
        Only the student carries gradient; any other adapter runs without grad and leaves exactly
        the student trainable afterwards."""
        uncond = self.encode([""] * x.shape[0]) if guidance_scale != 1.0 else None
        student = adapter == self.STUDENT
        switch = nullcontext() if student else active_adapter(self.backbone.transformer, adapter,
                                                              trainable=self.STUDENT)
        with switch, (nullcontext() if student else torch.no_grad()), self.autocast():
            return guided_velocity(self.backbone, x.to(self.backbone.dtype), sigma, cond, uncond, guidance_scale)

    def generator(self, purpose: int) -> torch.Generator:
        """A generator seeded by ``(seed, round, rank, purpose)`` (the :data:`~opd.utils.seeds.ROLLOUT`
        stream of :func:`~opd.utils.seeds.stream_seed`): resumable randomness."""
        seed = stream_seed(ROLLOUT, self.seed, self.round, self.global_rank, purpose)
        return torch.Generator(device=self.device).manual_seed(seed)

    def sample(self, prompts: list[str], *, kernel: str, noise_level: float, guidance_scale: float,
               keep_means: bool = False, purpose: int = 0) -> Trajectory:
        """Roll out the active adapter on ``prompts`` from round-seeded noise (``purpose`` tells
        several rollouts of one round apart)."""
        shape = self.backbone.latent_shape(self.image_size, self.image_size)
        noise = torch.randn((len(prompts), *shape), generator=self.generator(purpose), device=self.device)
        self.compute.add_images(len(prompts))
        cond = self.encode(prompts)
        uncond = self.encode([""] * len(prompts)) if guidance_scale != 1.0 else None
        sigmas = sd3_sigmas(self.sampler.num_steps, self.sampler.shift, device=self.device)
        with self.autocast():  # as the training forwards: GRPO's ratio starts at 1
            traj = rollout(self.backbone, cond, noise, sigmas, kernel=kernel, noise_level=noise_level,
                           guidance_scale=guidance_scale, uncond=uncond, generator=self.generator(purpose + 1),
                           keep_means=keep_means)
        self.note_nonfinite(f"the rollout of adapter {'/'.join(self.backbone.transformer.active_adapters())!r} "
                            f"(round {self.round}, purpose {purpose})", traj.final)
        return traj

    @property
    def image_size(self) -> int:
        return int(getattr(self.backbone, "image_size", 512))

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.check_precision()

    def check_precision(self) -> None:
        """The student is still fp32 (nothing recast it), and the backbone's dtype fits the trainer's
        precision: an fp16 backbone needs loss scaling (``trainer.precision=16-mixed``; fp16 gradients
        underflow without it), and loss scaling in fp16 with a bf16 backbone mixes two half types."""
        dtypes = lora_dtypes(self.backbone.transformer, self.STUDENT)
        if dtypes != {self.TRAINABLE_DTYPE}:
            raise RuntimeError(f"the student LoRA's parameters are {sorted(map(str, dtypes))}, not "
                               f"{self.TRAINABLE_DTYPE}: something cast the model after configure_model "
                               "(trainer.precision=bf16-true/16-true cast every weight; use *-mixed)")
        dtype, scaled = self.backbone.dtype, self.grad_scaler is not None
        if dtype == torch.float16 and not scaled:
            raise ValueError("the backbone is float16 (model.torch_dtype) but the trainer does no loss scaling: "
                             "use trainer.precision=16-mixed (on a GPU; Lightning turns 16-mixed into bf16-mixed "
                             "on a CPU), or model.torch_dtype=bfloat16")
        if dtype == torch.bfloat16 and scaled:
            raise ValueError("trainer.precision=16-mixed with a bfloat16 backbone: use model.torch_dtype=float16 "
                             "(fp16 training, as in the paper) or trainer.precision=bf16-mixed")

    def on_train_start(self) -> None:
        self._clock = time.monotonic() - 60 * self.elapsed_minutes  # a resumed run keeps counting
        self.measure_compute()

    def measure_compute(self) -> None:
        """Start counting transformer passes and measure the FLOPs of one (:mod:`opd.modules.compute`)."""
        shape = self.backbone.latent_shape(self.image_size, self.image_size)
        x = torch.randn((1, *shape), device=self.device)
        cond = self.encode([""])
        self.compute.measure(lambda: self.velocity_under(self.STUDENT, x, 0.5, cond, 1.0), self.policy_parameters())
        self.compute.attach(self.backbone.transformer)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        self._skipped_steps = 0
        with self.compute.counting():
            metrics = self.run_round()
        scaler = self.grad_scaler
        if scaler is not None:  # fp16: the loss scale and the round's steps skipped on overflowing gradients
            metrics["train/loss_scale"] = torch.tensor(float(scaler.get_scale()))
            metrics["train/skipped_steps"] = torch.tensor(float(self._skipped_steps))
        self.last_metrics = {k: float(v) for k, v in metrics.items() if torch.as_tensor(v).numel() == 1}
        self.round += 1
        self.elapsed_minutes = (time.monotonic() - self._clock) / 60
        self.log("train/round", float(self.round), on_step=True)
        self.log("time/minutes", self.elapsed_minutes, on_step=True)  # training wall-clock, for curves
        self.log_dict(self.compute.metrics(self.trainer.world_size), on_step=True)  # totals over all ranks
        if self.device.type == "cuda":  # what the run's tensors have needed so far, for scale records
            self.log("memory/peak_allocated_gib", torch.cuda.max_memory_allocated(self.device) / 2**30, on_step=True)
            self.log("memory/peak_reserved_gib", torch.cuda.max_memory_reserved(self.device) / 2**30, on_step=True)
        self.log_dict({k: v.float() for k, v in metrics.items()}, on_step=True, prog_bar=False)

    def run_round(self) -> dict[str, Tensor]:
        """One round of the algorithm; returns the metrics to log."""
        raise NotImplementedError

    def score_images(self, reward: Any, name: str, latents: Tensor, rows: list[dict]) -> dict[str, Tensor]:
        """Decode ``latents`` and score them with ``reward``; NaN/inf stops the run, naming the reward."""
        with torch.no_grad():
            images = self.backbone.decode(latents.to(self.backbone.dtype))
        scores = reward.score(images, [r["prompt"] for r in rows], rows)
        bad = ~torch.isfinite(scores["reward"])
        if bad.any():
            raise ValueError(f"reward {name!r} returned NaN/inf for {int(bad.sum())} image(s) in round "
                             f"{self.round} (prompts {[rows[i]['prompt'] for i in bad.nonzero().flatten()[:3]]})")
        return {k: v.to(self.device) for k, v in scores.items()}

    def results(self, futures: Sequence[Future], what: str) -> list[Any]:
        """The futures' results (reward scores from worker threads). If one raised on any rank, every
        rank raises (that rank its own error), so DDP ranks never wait on one that has stopped."""
        out, error = [], None
        for future in futures:
            try:
                out.append(future.result())
            except Exception as err:  # noqa: BLE001 — re-raised below, on every rank
                error = error or err
        if self._any_rank(error is not None):
            if error is not None:
                raise error
            raise RuntimeError(f"{what} failed on another rank in round {self.round} (see that rank's log)")
        return out

    def gathered_means(self, prefix: str, name: str, scores: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{prefix}/{name}[/key]`` means over all ranks (and the reward's std), for logging.

        A ``failed`` key (1.0 where the reward could not score an image; ``<component>/failed`` of a
        multi reward) is logged as ``{prefix}/{name}[/<component>]/failures``, the number of failed
        images of the round over all ranks; failing on every image stops the run (all ranks)."""
        out = {}
        for key, value in scores.items():
            gathered = self.all_gather(value).reshape(-1).float()
            if key == "failed" or key.endswith("/failed"):
                label = name if key == "failed" else f"{name}/{key.removesuffix('/failed')}"
                out[f"{prefix}/{label}/failures"] = gathered.sum()
                if gathered.numel() and bool((gathered > 0).all()):
                    raise RewardFailedError(
                        f"reward {label!r} failed on every image of round {self.round} ({gathered.numel()} images, "
                        f"logged under {prefix}/): it could not score any of them (is its engine or server "
                        "installed and reachable?); a round without a single score carries no signal, so the run stops")
                continue
            label = name if key == "reward" else f"{name}/{key}"
            out[f"{prefix}/{label}"] = gathered.mean()
            if key == "reward":
                out[f"{prefix}/{label}_std"] = gathered.std()
        return out

    @property
    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """Lightning's loss scaler (``trainer.precision=16-mixed``), or ``None`` (no scaling, no trainer)."""
        if self._trainer is None:
            return None
        return getattr(self.trainer.precision_plugin, "scaler", None)

    def optimizer_step_with_clip(self) -> Tensor:
        """Clip the global grad norm, step, zero; returns the pre-clip norm.

        With loss scaling (fp16) the gradients ``manual_backward`` accumulated are scaled: Lightning's
        step unscales them, then calls :meth:`on_before_optimizer_step`, which clips the unscaled
        gradients and runs the guard, then ``GradScaler.step``, which skips the update when a gradient
        is inf/NaN (the weights and the AdamW state stay as they were; the scale is lowered). Such a
        step returns its non-finite norm and counts in ``train/skipped_steps``; it is not an error."""
        opt = self.optimizers()
        if self.grad_scaler is None:
            norm = torch.nn.utils.clip_grad_norm_(self.policy_parameters(), self.grad_clip)
            self.note_nonfinite("the student's gradient norm", norm)
            self.raise_if_nonfinite()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return norm
        self._scaled_norm = None
        opt.step()
        opt.zero_grad(set_to_none=True)
        norm, self._scaled_norm = self._scaled_norm, None
        if norm is None:
            raise RuntimeError("loss scaling: the optimiser step did not call AdapterPolicy.on_before_optimizer_step "
                               "(a subclass overriding it must call super()); the gradient was not clipped")
        return norm

    def skip_optimizer_step(self) -> None:
        """Count an optimiser step that changes nothing: with every gradient ``None`` AdamW leaves each
        parameter and its state as they are, while Lightning's step counter (``trainer.max_steps``
        counts optimiser steps under manual optimisation) advances as for a real step. Not with fp16
        loss scaling, whose ``GradScaler.step`` refuses a step without gradients."""
        if self.grad_scaler is not None:
            raise ValueError("a round without an update cannot be counted under fp16 loss scaling "
                             "(trainer.precision=16-mixed): use trainer.precision=bf16-mixed")
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        opt.step()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """With loss scaling only (see :meth:`optimizer_step_with_clip`): Lightning has just unscaled
        the gradients; clip them and stop on non-finite losses or targets noted this step. Overflowing
        gradients are the scaler's business (it skips the step), not the guard's."""
        super().on_before_optimizer_step(optimizer)
        if self.grad_scaler is None:
            return
        norm = torch.nn.utils.clip_grad_norm_(self.policy_parameters(), self.grad_clip)
        if not is_finite(norm):
            self._skipped_steps += 1
        self.raise_if_nonfinite()
        self._scaled_norm = norm

    # -- export and checkpoints ---------------------------------------------------------------
    def on_train_end(self) -> None:
        """Export the student's EMA weights as a diffusers LoRA file in ``<output_dir>/adapter``."""
        self.export_adapter(Path(self.trainer.default_root_dir) / "adapter", "the student adapter")

    def export_adapter(self, out: Path, what: str) -> None:
        """The student's EMA weights as a diffusers LoRA file in ``out`` (rank 0; also the snapshots of
        :class:`opd.callbacks.snapshots.AdapterSnapshots`)."""
        self.export_ema(out, what, self.ema_parameters().items(),
                        lambda folder: save_lora(self.backbone.transformer, self.STUDENT, folder))

    def progress_label(self) -> str:
        return f"round {self.round}, step {self.global_step}"

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if "lora_" in k}
        checkpoint["opd_round"] = self.round
        checkpoint["opd_elapsed_minutes"] = self.elapsed_minutes
        checkpoint["opd_compute"] = self.compute.state_dict()
        super().on_save_checkpoint(checkpoint)  # last: the guard scans the finished checkpoint

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.round = int(checkpoint.get("opd_round", 0))
        self.elapsed_minutes = float(checkpoint.get("opd_elapsed_minutes", 0.0))
        self.compute.load_state_dict(checkpoint.get("opd_compute", {}))
