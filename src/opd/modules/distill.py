"""DiffusionOPD: distil frozen LoRA teachers into one student along the student's own rollouts.

One round = for each teacher ``m`` (MOPD round-robin; one teacher = SOPD): draw prompts from
teacher ``m``'s prompt set, roll out the student (its kernel, schedule, noise level and CFG), ask
teacher ``m`` for its mean at every state the student visited, and accumulate the per-step KL
(:class:`opd.objectives.opd.OPDLoss`) summed over the trained steps; one optimiser step per round.

Speed by design (docs/bench/README.md): after a rollout every ``(x_j, σ_j)`` is known, so the teacher's
targets for *all* steps are computed in large chunks (CFG as a doubled batch, per-sample σ), and
the student trains on chunks that span steps; prompt embeddings are cached. The step-by-step
loop of the reference implementation lives beside the benchmark (:func:`opd.bench.reference_loss`),
which tests that both give the same loss and measures both. Optional, off by default:
``merge_teacher_lora`` / ``merge_rollout_lora`` run the no-grad teacher targets / student rollouts
with that LoRA merged into the base weights (:func:`opd.models.speed.merged_lora`).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from opd.models.backbone import Backbone, PromptEmbeds
from opd.models.lora import load_lora, read_lora, resolve_lora_file
from opd.models.speed import merged_lora
from opd.modules.guards import NonFiniteError, file_sha256, is_finite
from opd.modules.policy import AdapterPolicy
from opd.objectives.opd import OPDLoss
from opd.sampling import Trajectory, transition
from opd.utils.seeds import TEACHER_PROMPTS, stream_seed

log = logging.getLogger(__name__)


#: what a checkpoint records for a teacher without an adapter (the base model) in place of a file hash
BASE_TEACHER = "base model"


@dataclass
class Teacher:
    """A frozen teacher adapter and what it is routed (``conf/teacher/<name>.yaml``). Without an
    adapter (``adapter: null``) the teacher is the base model itself at its own CFG scale: distilling
    the base at CFG 4.5 into a CFG-free student is CFG distillation."""

    name: str
    adapter: str | None
    prompts: list[dict]
    guidance_scale: float
    monitor: dict[str, Any]
    sha256: str = ""  # of the adapter file (BASE_TEACHER for the base): a resumed run must distil the same teachers

    @property
    def adapter_name(self) -> str | None:
        """The teacher's PEFT adapter name; ``None`` for the base model (adapters off)."""
        return None if self.adapter is None else f"teacher_{self.name}"

    @property
    def source(self) -> str:
        return "the base model" if self.adapter is None else f"adapter {self.adapter}"


def build_teachers(teachers: Mapping[str, Any]) -> list[Teacher]:
    """Validate teacher configs before any model is built: names unique, adapter files present and
    readable LoRA files of one shape with finite weights, prompt sets non-empty. Each adapter file's
    SHA-256 is kept (checkpoints record it; a resume with other teacher files is refused)."""
    if not teachers:
        raise ValueError("teacher: no teachers configured; add e.g. `teacher=[mini_ocr,mini_geneval]`")
    out, shapes, names = [], None, set()
    for key, cfg in teachers.items():
        name = cfg["name"]
        if name in names:
            raise ValueError(f"teacher.{key}: duplicate teacher name {name!r}; names must be unique")
        names.add(name)
        rows = list(cfg["prompts"])
        if not rows:
            raise ValueError(f"teacher.{key}.prompts: the prompt set is empty")
        monitor, scale = dict(cfg.get("monitor_reward") or {}), float(cfg["guidance_scale"])
        if cfg["adapter"] is None:  # the base model at its CFG scale
            out.append(Teacher(name, None, rows, scale, monitor, BASE_TEACHER))
            continue
        file = resolve_lora_file(cfg["adapter"])
        try:  # diffusers or PEFT layout, compared by module names (opd.models.lora_files.read_lora)
            weights = read_lora(file)
        except ValueError as err:
            raise ValueError(f"teacher.{key}.adapter: {err}") from err
        these = weights.modules()
        bad = [k for k, v in weights.state.items() if not is_finite(v)]
        if bad:
            raise NonFiniteError(f"teacher {name!r} (teacher.{key}.adapter={file}) holds non-finite weights in "
                                 f"{len(bad)} tensor(s), e.g. {bad[:3]}: distilling it would make the student NaN; "
                                 "re-export that teacher")
        if shapes is not None and these != shapes:
            raise ValueError(f"teacher.{key}.adapter: {file} has other LoRA keys/shapes than the first teacher's "
                             "adapter: the teachers were trained on different base models or LoRA settings")
        shapes = these
        out.append(Teacher(name, str(file), rows, scale, monitor, file_sha256(file)))
    return out


def _hashed(saved: str) -> str:
    """What a checkpoint's teacher record says, in words."""
    return "the base model as that teacher" if saved == BASE_TEACHER else f"adapter sha256 {saved}"


class OPDDistill(AdapterPolicy):
    """Student = a fresh LoRA on the base (B = 0, so it starts equal to it), or a copy of
    ``init_adapter`` (a second phase of an earlier student, e.g. at a lower lr); teachers = frozen
    adapters on the same backbone.

    A resume checks that every teacher's adapter file has the SHA-256 recorded in the checkpoint
    (and that the teacher names match); ``allow_teacher_change=True`` (the run-level flag of the
    same name in ``conf/train.yaml``) accepts other files with a warning.

    ``merge_teacher_lora`` / ``merge_rollout_lora`` (off by default; a speed lever of issue 18,
    measured by ``python -m opd.bench --levers``): the teacher's target passes / the student's
    rollouts, both without grad, run with that adapter merged into the base weights instead of as
    separate LoRA matmuls. The student's training passes always run unmerged (its LoRA trains). In
    bf16 the merge rounds ``W + ΔW`` to the base's precision (see :func:`~opd.models.speed.merged_lora`)."""

    def __init__(self, backbone: Callable[[], Backbone], teachers: Mapping[str, Any], objective: OPDLoss,
                 sampler: Any, optimizer: Callable[..., torch.optim.Optimizer], lora: dict[str, Any] | None = None,
                 prompts_per_teacher: int = 3, timestep_fraction: float = 0.99, target_chunk: int = 64,
                 train_chunk: int = 16, grad_clip: float = 1.0, seed: int = 0,
                 preview_prompts: Sequence[str] = (), teacher_weighting: str = "sum",
                 balance_decay: float = 0.9, balance_normalize: bool = False, init_adapter: str | None = None,
                 allow_teacher_change: bool = False, merge_teacher_lora: bool = False,
                 merge_rollout_lora: bool = False) -> None:
        self.teachers = build_teachers(teachers)
        self.allow_teacher_change = allow_teacher_change
        super().__init__(backbone, sampler, optimizer, lora, grad_clip, seed,
                         list(preview_prompts) or [t.prompts[0]["prompt"] for t in self.teachers], init_adapter)
        if sampler.kernel == "dpm2":
            raise ValueError("sampler.kernel=dpm2 keeps a history across steps; distil with a first-order kernel")
        self.objective = objective
        self.prompts_per_teacher = prompts_per_teacher
        self.timestep_fraction = timestep_fraction
        self.target_chunk = target_chunk
        self.train_chunk = train_chunk
        if teacher_weighting not in ("sum", "balanced"):
            raise ValueError(f"module.teacher_weighting must be 'sum' or 'balanced', got {teacher_weighting!r}")
        self.teacher_weighting = teacher_weighting
        self.balance_decay = balance_decay
        self.balance_normalize = balance_normalize
        self.merge_teacher_lora = merge_teacher_lora
        self.merge_rollout_lora = merge_rollout_lora
        self.kl_scale: dict[str, float] = {}  # balanced: running mean of each teacher's KL (all ranks)
        self._monitor_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opd-monitor")

    def configure_model(self) -> None:
        fresh = self.backbone is None
        super().configure_model()
        if fresh:
            for t in self.teachers:
                if t.adapter is not None:
                    load_lora(self.backbone.transformer, t.adapter, t.adapter_name)

    @property
    def num_trained_steps(self) -> int:
        return max(1, int(self.sampler.num_steps * self.timestep_fraction))

    # -- one round ---------------------------------------------------------------------------
    def draw(self, m: int) -> list[dict]:
        """This rank's prompts for teacher ``m`` this round (seeded by seed, round, teacher, rank)."""
        rows = self.teachers[m].prompts
        g = torch.Generator().manual_seed(stream_seed(TEACHER_PROMPTS, self.seed, self.round, m, self.global_rank))
        return [rows[i] for i in torch.randint(len(rows), (self.prompts_per_teacher,), generator=g).tolist()]

    def run_round(self) -> dict[str, Tensor]:
        """One round. Logs, per teacher, ``teacher/<name>/kl`` (this rank's mean over its samples of the
        KL summed over the trained steps, before any teacher weight or ``step_reduction``),
        ``teacher/<name>/weight`` (``balanced`` only) and its monitor rewards ``teacher/<name>/<reward>``;
        ``train/kl_sum`` (the sum of the teachers' ``teacher/<name>/kl``) and ``train/grad_norm``."""
        metrics: dict[str, Tensor] = {}
        total = 0.0
        pending = []  # monitor rewards run in a worker thread, off the critical path
        trajs = []  # every teacher's rollout first (no update happens within a round): the weights may need them all
        for m, teacher in enumerate(self.teachers):
            rows = self.draw(m)
            traj = self.rollout_student([r["prompt"] for r in rows], purpose=10 * (m + 1))  # own noise per teacher
            trajs.append(traj)
            for name, reward in teacher.monitor.items():
                pending.append((teacher.name, name, self._monitor_pool.submit(
                    self.score_images, reward, name, traj.final.detach(), rows)))
        # objective.step_reduction=mean: the authors' 1/(steps·teachers); it scales the gradient only,
        # so the logged KLs stay summed and comparable
        scale = self.objective.accumulation_weight(self.num_trained_steps, len(self.teachers))
        for teacher, traj, weight in zip(self.teachers, trajs, self.teacher_weights(trajs)):
            loss = self.distill_on(traj, teacher, backward=True, weight=weight * scale)
            self.note_loss(f"teacher/{teacher.name}/kl (teacher {teacher.name!r}, {teacher.source})", loss)
            self.update_kl_scale(teacher, loss)
            total += loss
            metrics[f"teacher/{teacher.name}/kl"] = loss.detach()
            if self.teacher_weighting == "balanced":
                metrics[f"teacher/{teacher.name}/weight"] = torch.as_tensor(weight)
        metrics["train/kl_sum"] = torch.as_tensor(total).detach()
        metrics["train/grad_norm"] = self.optimizer_step_with_clip()
        scores = self.results([future for _, _, future in pending], "a monitor reward")
        for (teacher_name, name, _), score in zip(pending, scores):  # gathered in a fixed order on every rank
            metrics.update(self.gathered_means(f"teacher/{teacher_name}", name, score))
        return metrics

    def rollout_student(self, prompts: list[str], purpose: int = 0) -> Trajectory:
        """The student's rollout on ``prompts`` (no grad) with the sampler's kernel, noise level and
        CFG; with ``merge_rollout_lora`` the student's LoRA is merged into the base for it."""
        merge = self.merged(self.STUDENT) if self.merge_rollout_lora else nullcontext()
        with torch.no_grad(), merge:
            return self.sample(prompts, kernel=self.sampler.kernel, noise_level=self.sampler.noise_level,
                               guidance_scale=self.sampler.guidance_scale, purpose=purpose)

    def merged(self, adapter: str) -> AbstractContextManager:
        """``adapter`` merged into the base weights, all adapters off; afterwards the student alone trains."""
        return merged_lora(self.backbone.transformer, adapter, trainable=self.STUDENT)

    # -- the loss, batched over steps --------------------------------------------------------
    def states(self, traj: Trajectory) -> tuple[Tensor, Tensor, Tensor, PromptEmbeds]:
        """Every trained ``(x_j, σ_j, σ_{j+1})`` of the rollout flattened to ``[B·T, ...]`` (step-major
        within a sample), with the matching prompt conditioning."""
        b, t = traj.latents.shape[0], self.num_trained_steps
        x = traj.latents[:, :t].reshape(b * t, *traj.latents.shape[2:])
        sigma = traj.sigmas[:t].repeat(b)
        sigma_next = traj.sigmas[1 : t + 1].repeat(b)
        idx = torch.arange(b, device=x.device).repeat_interleave(t)
        return x, sigma, sigma_next, traj.cond[idx]

    def means(self, x: Tensor, sigma: Tensor, sigma_next: Tensor, cond: PromptEmbeds, adapter: str,
              guidance_scale: float) -> tuple[Tensor, Tensor]:
        """The kernel's ``(mean, std)`` under ``adapter`` at states ``x`` (grad only for the student)."""
        v = self.velocity_under(adapter, x, sigma, cond, guidance_scale)
        step = transition(self.sampler.kernel, x, v, sigma, sigma_next, self.sampler.noise_level)
        return step.mean, step.std

    def teacher_targets(self, x: Tensor, sigma: Tensor, sigma_next: Tensor, cond: PromptEmbeds,
                        teacher: Teacher) -> Tensor:
        """Teacher means for all states, in chunks of ``target_chunk`` (no grad); with
        ``merge_teacher_lora`` the teacher's LoRA is merged into the base (once for all chunks) and
        the passes run with adapters off, as a base-model teacher's always do."""
        out = []
        merging = self.merge_teacher_lora and teacher.adapter_name is not None
        merge = self.merged(teacher.adapter_name) if merging else nullcontext()
        adapter = None if merging else teacher.adapter_name
        with merge:
            for sl in torch.arange(x.shape[0], device=x.device).split(self.target_chunk):
                out.append(self.means(x[sl], sigma[sl], sigma_next[sl], cond[sl], adapter,
                                      teacher.guidance_scale)[0])
        return torch.cat(out)

    def teacher_weight(self, teacher: Teacher, traj: Trajectory) -> float:
        """The weight of ``teacher``'s KL in this round's loss.

        ``sum`` (the paper): 1 for every teacher. ``balanced``: 1 / (running mean of the teacher's
        KL over earlier rounds and all ranks), so each teacher moves the shared LoRA about equally
        however far apart its targets are (on the mini world the GenEval teacher's KL is ~10x smaller
        than the others' and ``sum`` let them drown it). The first round measures the KL once
        without grad to start the mean; later rounds reuse the KL they compute anyway.
        """
        if self.teacher_weighting == "sum":
            return 1.0
        if teacher.name not in self.kl_scale:
            with torch.no_grad():
                self.kl_scale[teacher.name] = self.gathered_kl(self.distill_on(traj, teacher, backward=False))
        return 1.0 / max(self.kl_scale[teacher.name], 1e-12)

    def teacher_weights(self, trajs: Sequence[Trajectory]) -> list[float]:
        """This round's weight of every teacher (:meth:`teacher_weight`); with ``balance_normalize``
        the balanced weights are rescaled to average 1 over the teachers, so they keep their ratios
        but not their absolute size, which otherwise grows as the KLs shrink (1/KL: hundreds or
        thousands late in a run, so every round's gradient is cut by the clip norm)."""
        weights = [self.teacher_weight(t, traj) for t, traj in zip(self.teachers, trajs)]
        if self.teacher_weighting == "balanced" and self.balance_normalize:
            mean = sum(weights) / len(weights)
            weights = [w / mean for w in weights]
        return weights

    def gathered_kl(self, kl: Tensor) -> float:
        return self.all_gather(kl.detach()).float().mean().item()

    def update_kl_scale(self, teacher: Teacher, kl: Tensor) -> None:
        if self.teacher_weighting == "balanced":
            d = self.balance_decay
            self.kl_scale[teacher.name] = d * self.kl_scale[teacher.name] + (1 - d) * self.gathered_kl(kl)

    def without_teachers(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """``state`` less the teachers' adapter weights: they are frozen and always come from the
        teachers' files (checked by hash on a resume), so checkpoints leave them out (MOPD mini: 24.5 →
        20.6 MB), and with allow_teacher_change the new files are what the resumed run distils, not a
        checkpoint's copies of the old ones (older checkpoints hold them: dropped on loading)."""
        teacher_keys = tuple(f".{t.adapter_name}." for t in self.teachers if t.adapter_name is not None)
        return {k: v for k, v in state.items() if not any(key in k for key in teacher_keys)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = self.without_teachers(checkpoint["state_dict"])
        checkpoint["opd_kl_scale"] = dict(self.kl_scale)
        checkpoint["opd_teacher_sha256"] = {t.name: t.sha256 for t in self.teachers}
        super().on_save_checkpoint(checkpoint)  # last: the guard scans the finished checkpoint

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = self.without_teachers(checkpoint.get("state_dict", {}))
        super().on_load_checkpoint(checkpoint)
        self.check_teachers(checkpoint.get("opd_teacher_sha256"))
        self.kl_scale = dict(checkpoint.get("opd_kl_scale", {}))

    def check_teachers(self, saved: Mapping[str, str] | None) -> None:
        """A resume must distil the teachers the checkpoint was trained with (same names, same
        adapter bytes) unless ``allow_teacher_change``."""
        if saved is None:
            log.warning("the checkpoint records no teacher hashes (written by an older version): cannot check "
                        "that the teachers are the ones it was trained with")
            return
        now = {t.name: t for t in self.teachers}
        problems = [f"teacher {name!r}: the checkpoint was trained with {_hashed(saved[name])}, "
                    f"now it is {now[name].source}" + ("" if now[name].adapter is None else f" with sha256 {now[name].sha256}")
                    for name in saved if name in now and saved[name] != now[name].sha256]
        problems += [f"teacher {name!r} is in the checkpoint but not configured" for name in saved if name not in now]
        problems += [f"teacher {name!r} is configured but not in the checkpoint" for name in now if name not in saved]
        if not problems:
            return
        message = "resuming with other teachers than the checkpoint's: " + "; ".join(problems)
        if not self.allow_teacher_change:
            raise ValueError(message + ". Resume with the original teacher files, or pass allow_teacher_change=true "
                             "to continue with these on purpose")
        log.warning("%s (allow_teacher_change=true: continuing)", message)

    def distill_on(self, traj: Trajectory, teacher: Teacher, backward: bool, weight: float = 1.0) -> Tensor:
        """``mean_i Σ_j KL_ij`` for one teacher; with ``backward`` the gradient of ``weight`` times it
        is accumulated chunk by chunk (chunks span steps), so memory is set by ``train_chunk``, not
        by ``B·T``. Returns the unweighted KL."""
        x, sigma, sigma_next, cond = self.states(traj)
        target = self.teacher_targets(x, sigma, sigma_next, cond, teacher)
        self.note_nonfinite(f"the targets of teacher {teacher.name!r} ({teacher.source})", target)
        b = traj.latents.shape[0]
        total = torch.zeros((), device=x.device)
        for sl in torch.arange(x.shape[0], device=x.device).split(self.train_chunk):
            mean, std = self.means(x[sl], sigma[sl], sigma_next[sl], cond[sl], self.STUDENT,
                                   self.sampler.guidance_scale)
            loss, _ = self.objective(mean, target[sl], std, sigma[sl] - sigma_next[sl])
            part = loss * (sl.numel() / b)  # the chunk's share of Σ_j mean_i
            if backward:
                self.manual_backward(part * weight)
            total = total + part.detach()
        return total
