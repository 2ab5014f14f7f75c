"""Rollouts: run a backbone with classifier-free guidance over a σ grid with a pure kernel."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from opd.models.backbone import Backbone, PromptEmbeds
from opd.sampling.kernels import History, transition
from opd.utils.seeds import GENERATE, stream_seed


@dataclass
class Trajectory:
    """One batch of sampled trajectories.

    ``latents [B, T+1, C, H, W]`` (``[:, 0]`` the initial noise, ``[:, -1]`` the sample),
    ``sigmas [T+1]``, ``log_probs [B, T]`` of each sampled step under the rollout policy
    (``None`` for a deterministic kernel), ``means [B, T, C, H, W]`` when requested (GRPO-Guard
    needs the old policy's means), and the prompt conditioning used.
    """

    latents: Tensor
    sigmas: Tensor
    log_probs: Tensor | None
    cond: PromptEmbeds
    means: Tensor | None = None

    @property
    def num_steps(self) -> int:
        return self.sigmas.shape[0] - 1

    @property
    def final(self) -> Tensor:
        """The sampled latents ``[B, C, H, W]``."""
        return self.latents[:, -1]

    @staticmethod
    def cat(parts: list[Trajectory]) -> Trajectory:
        """Concatenate trajectories of the same schedule along the batch."""
        def maybe(xs: list[Tensor | None]) -> Tensor | None:
            return None if any(x is None for x in xs) else torch.cat(xs)

        return Trajectory(latents=torch.cat([p.latents for p in parts]), sigmas=parts[0].sigmas,
                          log_probs=maybe([p.log_probs for p in parts]),
                          cond=PromptEmbeds.cat([p.cond for p in parts]), means=maybe([p.means for p in parts]))


def guided_velocity(backbone: Backbone, x: Tensor, sigma: Tensor | float, cond: PromptEmbeds,
                    uncond: PromptEmbeds | None, guidance_scale: float) -> Tensor:
    """``v = v_u + w (v_c − v_u)``, one doubled batch ``[uncond; cond]`` as diffusers does.

    ``guidance_scale == 1`` (or no ``uncond``) is a single conditional pass.
    """
    sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).expand(x.shape[0])
    if guidance_scale == 1.0 or uncond is None:
        return backbone.velocity(x, sigma, cond)
    v = backbone.velocity(torch.cat([x, x]), torch.cat([sigma, sigma]), PromptEmbeds.cat([uncond, cond]))
    v_uncond, v_cond = v.chunk(2)
    return v_uncond + guidance_scale * (v_cond - v_uncond)


@torch.no_grad()
def rollout(backbone: Backbone, cond: PromptEmbeds, noise: Tensor, sigmas: Tensor, *, kernel: str = "ode",
            noise_level: float = 0.0, guidance_scale: float = 1.0, uncond: PromptEmbeds | None = None,
            generator: torch.Generator | None = None, keep_means: bool = False) -> Trajectory:
    """Sample ``B`` trajectories from ``noise [B, C, H, W]`` along ``sigmas [T+1]``.

    ``uncond`` is the (already batch-sized) empty-prompt conditioning for CFG. Stochastic kernels
    draw their noise from ``generator``; latents are kept in float32 between steps.
    """
    x = noise.float()
    states, log_probs, means = [x], [], []
    history: History | None = None
    for j in range(sigmas.shape[0] - 1):
        v = guided_velocity(backbone, x.to(backbone.dtype), sigmas[j], cond, uncond, guidance_scale)
        step = transition(kernel, x, v, sigmas[j], sigmas[j + 1], noise_level, history)
        x = step.sample(generator) if bool((step.std > 0).any()) else step.mean
        if bool((step.std > 0).all()):
            log_probs.append(step.log_prob(x))
        if keep_means:
            means.append(step.mean)
        history = step.history
        states.append(x)
    return Trajectory(
        latents=torch.stack(states, dim=1),
        sigmas=sigmas,
        log_probs=torch.stack(log_probs, dim=1) if len(log_probs) == len(states) - 1 else None,
        cond=cond,
        means=torch.stack(means, dim=1) if keep_means else None,
    )


@torch.no_grad()
def generate(backbone: Backbone, prompts: list[str], *, num_steps: int = 40, guidance_scale: float = 4.5,
             shift: float = 3.0, height: int | None = None, width: int | None = None, seed: int = 0,
             kernel: str = "ode", noise_level: float = 0.0, batch_size: int = 64,
             seeds: Sequence[int] | None = None) -> Tensor:
    """Prompts → images ``[B, 3, H, W]`` in [0, 1] (CPU, float32), reproducible from ``seed``.

    The initial noise of image ``i`` depends only on ``(seed, i)``, so results do not change
    with ``batch_size``. ``seeds`` (one per prompt) instead seeds image ``i``'s initial noise with
    ``seeds[i]`` alone, so an image does not depend on the call it is part of (the evaluation
    passes :func:`opd.evaluation.seeds.image_seed` of each image). Either way a stochastic kernel's
    per-step noise comes from one generator per batch (seeded ``seed + start``, or ``seeds[start]``),
    so only the deterministic ``"ode"`` kernel is fully batch-independent.
    """
    from opd.sampling.schedules import sd3_sigmas

    size = getattr(backbone, "image_size", None)
    height, width = height or size, width or size
    if height is None or width is None:
        raise ValueError("generate: pass height and width for this backbone")
    shape = backbone.latent_shape(height, width)
    sigmas = sd3_sigmas(num_steps, shift, device=backbone.device)
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"generate: {len(seeds)} seeds for {len(prompts)} prompts; pass one per prompt")
    noise_seeds = list(seeds) if seeds is not None else [stream_seed(GENERATE, seed, i) for i in range(len(prompts))]
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        noise = torch.stack([
            torch.randn(shape, generator=torch.Generator().manual_seed(s))
            for s in noise_seeds[start : start + len(chunk)]
        ]).to(backbone.device)
        cond = backbone.encode_prompts(chunk)
        uncond = backbone.encode_prompts([""] * len(chunk)) if guidance_scale != 1.0 else None
        gen = torch.Generator(device=backbone.device).manual_seed(seed + start if seeds is None else seeds[start])
        traj = rollout(backbone, cond, noise, sigmas, kernel=kernel, noise_level=noise_level,
                       guidance_scale=guidance_scale, uncond=uncond, generator=gen)
        images.append(backbone.decode(traj.final.to(backbone.dtype)).float().cpu())
    return torch.cat(images)
