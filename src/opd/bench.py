"""DiffusionOPD throughput: our batched module vs a reference-style loop, in one process.

    python -m opd.bench [--model sd35m-random|sd3-tiny|mini] [--batch 24] [--iters 3] [--out bench.json]

(a) ours: rollout of ``--batch`` trajectories, teacher targets for all steps in large chunks, the
student trained on chunks spanning steps (``OPDDistill.distill_on``); (b) reference-style: the
authors' script, batch 3, one teacher and one student pass per step (:func:`reference_loss`).
Both use the same module, kernel, CFG and LoRA, so the math per trajectory is identical; the
figures are trajectories distilled per second, their ratio, peak memory and (on a GPU) model
FLOPs utilisation against the chip's measured bf16 matmul peak. On a GPU the default model is an
SD3.5-Medium-shaped transformer with random weights at 512 px (1024 image + 205 text tokens: CLIP's 77 + T5's 128).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from opd.models.backbone import Backbone, PromptEmbeds
from opd.models.lora import add_lora, lora_parameters, save_lora
from opd.modules.distill import OPDDistill, Teacher
from opd.objectives.opd import OPDLoss
from opd.sampling import Trajectory

#: SD3.5-Medium's MMDiT (2.24 B parameters), from its published transformer config
SD35_MEDIUM = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
                   "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
                   "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
                   "qk_norm": "rms_norm", "dual_attention_layers": tuple(range(13))}


class RandomConditionBackbone(Backbone):
    """A transformer with random, prompt-seeded conditioning (no text encoders, no VAE): enough for
    throughput, which only the transformer decides."""

    def __init__(self, transformer: torch.nn.Module, text_tokens: int, latent: tuple[int, int, int]) -> None:
        super().__init__()
        self.transformer = transformer
        self.text_tokens = text_tokens
        self.latent = latent
        self.image_size = latent[1] * 8

    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        cfg = self.transformer.config
        gens = [torch.Generator().manual_seed(zlib.crc32(p.encode())) for p in prompts]
        embeds = torch.stack([torch.randn(self.text_tokens, cfg.joint_attention_dim, generator=g) for g in gens])
        pooled = torch.stack([torch.randn(cfg.pooled_projection_dim, generator=g) for g in gens])
        return PromptEmbeds(embeds.to(self.device, self.dtype), pooled.to(self.device, self.dtype))

    def decode(self, latents: Tensor) -> Tensor:
        raise NotImplementedError("the benchmark never decodes")

    def encode_images(self, images: Tensor) -> Tensor:
        raise NotImplementedError("the benchmark never encodes images")

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return self.latent


#: the same architecture cut down to seconds on a CPU (a dry run of the GPU path, and its test)
SD3_TINY = {**SD35_MEDIUM, "sample_size": 16, "num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2,
            "joint_attention_dim": 32, "caption_projection_dim": 32, "pooled_projection_dim": 16,
            "pos_embed_max_size": 16, "dual_attention_layers": (0,)}


def build_backbone(model: str, device: str, dtype: torch.dtype) -> Backbone:
    """``sd35m-random``: SD3.5-Medium's transformer at 512 px (64×64×16 latents, 205 text tokens);
    ``sd3-tiny``: the same code path at toy size; ``mini``: the mini world's base architecture."""
    from diffusers import SD3Transformer2DModel

    if model in ("sd35m-random", "sd3-tiny"):
        big = model == "sd35m-random"
        with torch.device(device):  # 2.2 B random parameters are initialised where they will run
            net = SD3Transformer2DModel(**(SD35_MEDIUM if big else SD3_TINY))
        return RandomConditionBackbone(net, 205 if big else 7, (16, 64, 64) if big else (16, 8, 8)).to(device, dtype)
    from opd.models.mini import MiniBackbone

    return MiniBackbone().to(device, dtype)


def build_module(backbone: Backbone, args: argparse.Namespace, workdir: Path) -> OPDDistill:
    """An :class:`OPDDistill` with one random teacher adapter, outside a Trainer."""
    add_lora(backbone.transformer, "t", rank=32, alpha=64)
    with torch.no_grad():
        for p in lora_parameters(backbone.transformer, "t"):
            p.add_(0.01 * torch.randn_like(p))
    save_lora(backbone.transformer, "t", workdir / "teacher")
    backbone.transformer.delete_adapters("t")
    teachers = {"t": {"name": "t", "adapter": str(workdir / "teacher"), "prompts": [{"prompt": f"prompt {i}"}
                for i in range(64)], "guidance_scale": 4.5, "monitor_reward": None}}
    sampler = SimpleNamespace(kernel=args.kernel, noise_level=args.noise_level, num_steps=args.steps, shift=3.0,
                              guidance_scale=4.5)
    module = OPDDistill(lambda: backbone, teachers, OPDLoss(), sampler, torch.optim.AdamW, lora={"rank": 32, "alpha": 64},
                        prompts_per_teacher=args.batch, target_chunk=args.target_chunk, train_chunk=args.train_chunk)
    module.configure_model()
    module.to(backbone.device)  # outside a Trainer nothing else tells the module where its noise belongs
    module.manual_backward = lambda loss: loss.backward()  # type: ignore[method-assign]
    return module


def reference_loss(module: OPDDistill, traj: Trajectory, teacher: Teacher) -> Tensor:
    """``module``'s objective computed as the authors' script does: step by step, one teacher and one
    student pass per step for the whole batch. The benchmark's baseline, and the test that the
    module's batched :meth:`~opd.modules.distill.OPDDistill.distill_on` gives the same loss and gradient."""
    b, total = traj.latents.shape[0], torch.zeros((), device=module.device)
    for j in range(module.num_trained_steps):
        x = traj.latents[:, j]
        s, sn = traj.sigmas[j].expand(b), traj.sigmas[j + 1].expand(b)
        target, _ = module.means(x, s, sn, traj.cond, teacher.adapter_name, teacher.guidance_scale)
        mean, std = module.means(x, s, sn, traj.cond, module.STUDENT, module.sampler.guidance_scale)
        total = total + module.objective(mean, target, std, s - sn)[0]
    return total


def iteration(module: OPDDistill, opt: torch.optim.Optimizer, prompts: list[str], batched: bool,
              ref_batch: int) -> None:
    """One distillation iteration over ``prompts`` (rollout, targets, student update)."""
    teacher = module.teachers[0]
    chunks = [prompts] if batched else [prompts[i : i + ref_batch] for i in range(0, len(prompts), ref_batch)]
    with torch.autocast(module.backbone.device.type, dtype=torch.bfloat16, enabled=module.backbone.device.type == "cuda"):
        for chunk in chunks:
            with torch.no_grad():
                traj = module.sample(chunk, kernel=module.sampler.kernel, noise_level=module.sampler.noise_level,
                                     guidance_scale=module.sampler.guidance_scale)
            if batched:
                module.distill_on(traj, teacher, backward=True)
            else:
                reference_loss(module, traj, teacher).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure(module: OPDDistill, opt: torch.optim.Optimizer, batched: bool, args: argparse.Namespace,
            count_flops: bool = False) -> dict[str, float]:
    """Seconds per iteration over ``args.iters`` timed iterations after one warm-up iteration (which,
    with ``count_flops``, also counts the iteration's model FLOPs with torch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    prompts = [f"prompt {i}" for i in range(args.batch)]
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out: dict[str, float] = {}
    with FlopCounterMode(display=False) if count_flops else contextlib.nullcontext() as counter:
        iteration(module, opt, prompts, batched, args.ref_batch)
    if count_flops:
        out["flops_per_iteration"] = float(counter.get_total_flops())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    for _ in range(args.iters):
        iteration(module, opt, prompts, batched, args.ref_batch)
    sync()
    seconds = (time.perf_counter() - start) / args.iters
    out.update(seconds_per_iteration=seconds, trajectories_per_second=args.batch / seconds)
    if "flops_per_iteration" in out:
        out["achieved_tflops"] = out["flops_per_iteration"] / seconds / 1e12
    if cuda:
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def matmul_peak_tflops(device: str) -> float | None:
    """The chip's measured bf16 matmul throughput (8192³), the denominator of MFU."""
    if device != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 20 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--model", default="sd35m-random" if cuda else "mini", choices=["sd35m-random", "sd3-tiny", "mini"])
    parser.add_argument("--batch", type=int, default=24 if cuda else 6, help="trajectories per iteration (ours)")
    parser.add_argument("--ref-batch", type=int, default=3, help="the reference script's batch")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--kernel", default="ode")
    parser.add_argument("--noise-level", type=float, default=0.0)
    parser.add_argument("--target-chunk", type=int, default=64)
    parser.add_argument("--train-chunk", type=int, default=16)
    parser.add_argument("--iters", type=int, default=3, help="timed iterations after one warm-up")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here (after every stage)")
    args = parser.parse_args(argv)
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    result: dict[str, Any] = {"device": torch.cuda.get_device_name() if cuda else "cpu", "model": args.model,
                              "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()}}

    def report(stage: str) -> None:  # written after every stage: a run cut short keeps what it measured
        print(f"[bench] {stage}: {json.dumps(result.get(stage))}", flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2))

    result["matmul_peak_tflops"] = matmul_peak_tflops(device)
    report("matmul_peak_tflops")
    with tempfile.TemporaryDirectory() as tmp:
        module = build_module(build_backbone(args.model, device, dtype), args, Path(tmp))
    result["student_lora_parameters"] = sum(p.numel() for p in module.policy_parameters())
    opt = torch.optim.AdamW(module.policy_parameters(), lr=1e-5)
    peak = result["matmul_peak_tflops"]
    ours = result["ours"] = measure(module, opt, True, args, count_flops=True)
    if peak:
        ours["mfu"] = ours["achieved_tflops"] / peak
    report("ours")
    ref = result["reference_style"] = measure(module, opt, False, args)
    ref["achieved_tflops"] = ours["flops_per_iteration"] / ref["seconds_per_iteration"] / 1e12  # same math
    if peak:
        ref["mfu"] = ref["achieved_tflops"] / peak
    result["speedup"] = ours["trajectories_per_second"] / ref["trajectories_per_second"]
    report("reference_style")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
