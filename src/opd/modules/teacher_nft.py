"""DiffusionNFT teacher training: forward-process (flow-matching) fine-tuning on the old
policy's own samples, with implicit positive/negative policies around a soft-updated "old"
adapter (docs/algorithms.md, DiffusionNFT).

One round: CFG-free deterministic rollout of the *old* adapter → rewards → group advantages →
optimality probabilities ``r`` → fresh noising of each clean sample at ``num_train_steps``
random grid times → ``num_updates_per_round`` optimiser steps of the NFT loss → soft update
``θ_old ← η θ_old + (1 − η) θ``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from opd.models.lora import active_adapter, add_lora, lora_parameters, set_trainable
from opd.modules.online_rl import OnlineRL
from opd.objectives.advantages import nonzero_advantage_mask
from opd.objectives.nft import nft_noising, old_policy_decay, optimality_probability, soft_update_


class NFTTeacher(OnlineRL):
    """``objective`` is an ``NFTLoss``; ``decay_schedule`` is ``linear`` (GenEval, PickScore) or
    ``delayed`` (OCR).

    ``skip_zero_variance_groups`` (off in the reference, which has no zero-advantage filtering) leaves
    the samples of groups whose rewards are all equal (advantage exactly 0, so ``r = 1/2``) out of the
    loss: they carry no preference, but the NFT loss still has a gradient on them (fresh noise each
    round, and θ ≠ θ_old), which Adam scales up to full-size steps. A round in which every group of
    every rank is such a group makes no optimiser step and no old-policy update
    (``train/skipped_round`` = 1). Every rank still runs its passes, so DDP stays in step.

    How the passes are batched (the same loss and gradients, in fewer and larger forwards; a small
    model such as the mini world's is bound by the number of calls on a GPU, not by their size):
    ``nograd_chunk`` — the old policy's and the reference's velocities at every (sample, noised
    time) of the round are computed before the updates, in no-grad forwards of this many states
    (``None``: one forward per noised time over all the round's samples); neither adapter changes
    during a round's updates, so computing them first changes nothing;
    ``terms_per_forward`` — the student's forward + backward covers up to this many noised times at
    once (the last group may be smaller; activation memory grows with it).
    """

    OLD = "old"

    def __init__(self, *args: Any, objective: Any, num_train_steps: int = 9, num_updates_per_round: int = 1,
                 decay_schedule: str = "linear", skip_zero_variance_groups: bool = False,
                 nograd_chunk: int | None = None, terms_per_forward: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nograd_chunk = nograd_chunk
        self.terms_per_forward = terms_per_forward
        self.skip_zero_variance_groups = skip_zero_variance_groups
        self.objective = objective
        self.num_train_steps = num_train_steps
        self.num_updates_per_round = num_updates_per_round
        self.decay_schedule = decay_schedule
        self.num_updates = 0

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.skip_zero_variance_groups and self.grad_scaler is not None:  # before any round is paid for
            raise ValueError("module.skip_zero_variance_groups=true needs rounds without an update, which fp16 loss "
                             "scaling (trainer.precision=16-mixed) cannot count: use trainer.precision=bf16-mixed")

    def configure_model(self) -> None:
        fresh = self.backbone is None
        super().configure_model()
        if fresh:
            # fp32 like the student: its soft update θ_old ← η θ_old + (1 − η) θ is not rounded to bf16
            add_lora(self.backbone.transformer, self.OLD, dtype=self.TRAINABLE_DTYPE, **self.lora)
            with torch.no_grad():
                for old, new in zip(self.old_parameters(), self.policy_parameters()):
                    old.copy_(new)
            self.backbone.transformer.set_adapter(self.STUDENT)
            set_trainable(self.backbone.transformer, self.STUDENT)

    def old_parameters(self) -> list[torch.nn.Parameter]:
        return lora_parameters(self.backbone.transformer, self.OLD)

    def velocity(self, x: Tensor, t: Tensor, cond: Any, adapter: str | None) -> Tensor:
        """CFG-free velocity under ``adapter`` (the student carries grad, the others do not)."""
        return self.velocity_under(adapter, x, t, cond, 1.0)

    def nograd_velocities(self, x_t: Tensor, t: Tensor, cond: Any, adapter: str | None) -> Tensor:
        """``adapter``'s velocity (``None``: the reference) at every state of ``x_t [B, S, ...]``
        (times ``t [B, S]``), ``[B, S, ...]``, in no-grad forwards of ``nograd_chunk`` states."""
        b, s = t.shape
        if self.nograd_chunk is None:  # one forward per noised time, over all samples
            return torch.stack([self.velocity(x_t[:, k], t[:, k], cond, adapter) for k in range(s)], dim=1)
        chunk = self.nograd_chunk
        flat_x, flat_t = x_t.flatten(0, 1), t.flatten()
        sample = torch.arange(b, device=t.device).repeat_interleave(s)  # the prompt of each flat state
        parts = [self.velocity(flat_x[sl], flat_t[sl], cond[sample[sl]], adapter)
                 for sl in torch.arange(b * s, device=t.device).split(chunk)]
        return torch.cat(parts).reshape(b, s, *x_t.shape[2:])

    def targets(self, x_t: Tensor, t: Tensor, cond: Any) -> tuple[Tensor, Tensor | None]:
        """The old policy's velocities at the noised states and, with a KL term, the reference's."""
        v_old = self.nograd_velocities(x_t, t, cond, self.OLD)
        v_ref = self.nograd_velocities(x_t, t, cond, None) if getattr(self.objective, "kl_weight", 0) > 0 else None
        return v_old, v_ref

    def run_round(self) -> dict[str, Tensor]:
        rows, group_ids = self.draw_round()
        with active_adapter(self.backbone.transformer, self.OLD, trainable=self.STUDENT):
            traj, pending = self.sample_and_submit(rows)
        x0 = traj.final.float()
        x_t, t, _ = nft_noising(x0, traj.sigmas, self.num_train_steps, self.generator(2))
        cond = traj.cond
        # the targets need no rewards: computed while the last rollout piece is scored (a round that may be
        # skipped for want of reward spread computes them only if it is not)
        targets = None if self.skip_zero_variance_groups else self.targets(x_t, t, cond)
        scores = self.collect_scores(pending)
        advantages = self.advantages(scores["reward"], group_ids)
        r = optimality_probability(advantages)
        self.note_nonfinite(f"the optimality probabilities of reward {self.reward_name!r}", r)
        metrics = self.log_rewards(scores)
        weights = None
        if self.skip_zero_variance_groups:
            keep = nonzero_advantage_mask(advantages).float()
            counts = self.all_gather(torch.stack([keep.sum(), torch.tensor(float(keep.numel()), device=keep.device)]))
            kept, total = counts.reshape(-1, 2).sum(dim=0).tolist()
            metrics["train/kept_fraction"] = torch.tensor(kept / total)
            metrics["train/skipped_round"] = torch.tensor(float(kept == 0))
            if kept == 0:  # nothing to prefer anywhere: no update (the same decision on every rank)
                self.skip_optimizer_step()
                metrics["train/r_mean"] = r.mean()
                return metrics
            weights = keep * (total / kept)  # the loss stays a mean over the kept samples of all ranks

        v_old, v_ref = targets if targets is not None else self.targets(x_t, t, cond)
        num_times = x_t.shape[1]
        groups = [slice(i, min(i + self.terms_per_forward, num_times))
                  for i in range(0, num_times, self.terms_per_forward)]

        def term_loss(idx: Tensor, g: int) -> tuple[Tensor, dict[str, Tensor]]:
            # the noised times of group g for the samples idx, as one batch (time-major): the loss's means
            # over it are the mean over its n times of each time's mean; scaled by n·G/S, the mean over the
            # G groups that update_round takes is the mean over all S times, whatever the groups' sizes
            times = groups[g]
            n = times.stop - times.start
            scale = n * len(groups) / num_times

            def batch(a: Tensor) -> Tensor:  # only the group's times of the samples idx are copied
                return a[idx, times].transpose(0, 1).flatten(0, 1)

            xs, ts = batch(x_t), batch(t)
            loss, terms = self.objective(
                self.velocity(xs, ts, cond[idx.repeat(n)], self.STUDENT).float(), batch(v_old).float(), xs,
                x0[idx].repeat(n, *([1] * (x0.ndim - 1))), ts, r[idx].repeat(n),
                v_ref=None if v_ref is None else batch(v_ref).float(),
                **({} if weights is None else {"weights": weights[idx].repeat(n)}))
            return loss * scale, {key: value * scale for key, value in terms.items()}

        metrics.update(self.update_round(x0.shape[0], len(groups), self.num_updates_per_round, term_loss,
                                         f"the {type(self.objective).__name__} loss at noised-time group"))
        self.num_updates += self.num_updates_per_round
        eta = old_policy_decay(self.num_updates, self.decay_schedule)
        soft_update_(self.old_parameters(), self.policy_parameters(), eta)
        metrics["train/old_decay"] = torch.tensor(eta)
        metrics["train/r_mean"] = r.mean()
        return metrics

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["opd_num_updates"] = self.num_updates
        super().on_save_checkpoint(checkpoint)  # last: the guard scans the finished checkpoint

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.num_updates = int(checkpoint.get("opd_num_updates", 0))
