"""DiffusionOPD throughput: our batched module vs a reference-style loop, in one process.

    python -m opd.bench [--model sd35m-random|sd3-tiny|mini] [--batch 24] [--iters 3] [--out bench.json]
                        [lever flags] [--levers [NAME ...]] [--batch-sweep 6 12 24]

(a) ours: rollout of ``--batch`` trajectories, teacher targets for all steps in large chunks, the
student trained on chunks spanning steps (``OPDDistill.distill_on``); (b) reference-style: the
authors' script, batch 3, one teacher and one student pass per step, each step backpropagated as
soon as it is computed (:func:`reference_backward`; :func:`reference_loss` is the same sum in one
graph, for tests). Both use the same kernel, CFG and LoRA, so the math per trajectory is identical;
the figures are trajectories distilled per second, their ratio, peak memory, seconds split into
rollout, teacher targets and training, and (on a GPU) model FLOPs utilisation against the chip's
measured bf16 matmul peak. On a GPU the default model is an SD3.5-Medium-shaped transformer with
random weights at 512 px (1024 image + 205 text tokens: CLIP's 77 + T5's 128).

Levers beyond batching (issue 18, :mod:`opd.models.speed`) apply to (a) only; (b) always runs the
plain module, as the authors' script would: ``--compile``, ``--merge-teacher``, ``--merge-rollout``,
``--attention``, ``--gradient-checkpointing`` (with ``--train-chunk``), ``--fp8`` (GPU only) and
``--cfg-free`` (the student samples and trains at guidance 1; the teacher keeps its CFG).
``--levers`` measures the plain module, then each lever alone on a fresh module of the same seed;
``--batch-sweep`` measures (a) at several batch sizes. The JSON is rewritten after every stage.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from opd.models.backbone import Backbone, PromptEmbeds
from opd.models.lora import add_lora, lora_parameters, save_lora
from opd.models.speed import (
    ATTENTION_BACKENDS,
    attention_backend,
    compile_blocks,
    enable_fp8,
    enable_gradient_checkpointing,
    fp8_supported,
)
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


#: the lever flags as a plain run has them: the baseline of ``--levers`` and the reference-style loop's module
PLAIN = {"compile": False, "merge_teacher": False, "merge_rollout": False, "attention": "default",
         "gradient_checkpointing": False, "fp8": False, "cfg_free": False}
#: ``--levers`` entries in the order they are measured (the slow-to-warm ``compile`` last)
LEVERS = ("cfg_free", "merge_teacher", "merge_rollout", "attention_flash", "attention_efficient", "attention_cudnn",
          "attention_math", "train_chunk_half", "train_chunk_double", "checkpointing", "checkpointing_chunk_x4",
          "fp8", "compile")
#: where an iteration's seconds go (``<phase>_seconds`` in the figures)
PHASES = ("rollout", "targets", "train")


def lever_flags(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The flags lever ``name`` sets on the plain module. Chunk levers are relative to ``--train-chunk``:
    halving and doubling it trade memory for fewer, larger backward passes; checkpointing frees
    activation memory, which pays only if it buys a larger chunk (``checkpointing_chunk_x4``)."""
    chunk = args.train_chunk
    if name.startswith("attention_"):
        return {"attention": name.removeprefix("attention_")}
    table = {"cfg_free": {"cfg_free": True}, "merge_teacher": {"merge_teacher": True},
             "merge_rollout": {"merge_rollout": True}, "train_chunk_half": {"train_chunk": max(1, chunk // 2)},
             "train_chunk_double": {"train_chunk": 2 * chunk}, "checkpointing": {"gradient_checkpointing": True},
             "checkpointing_chunk_x4": {"gradient_checkpointing": True, "train_chunk": 4 * chunk},
             "fp8": {"fp8": True}, "compile": {"compile": True}}
    if name not in table:
        raise ValueError(f"--levers: unknown lever {name!r}; choose from {', '.join(LEVERS)}")
    return table[name]


def with_flags(args: argparse.Namespace, **flags: Any) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **flags})


def levers_on(args: argparse.Namespace) -> list[str]:
    """The lever flags ``args`` sets, as typed (``--compile``, ``--attention flash``)."""
    out = []
    for key, plain in PLAIN.items():
        value = getattr(args, key, plain)
        if value != plain:
            out.append(f"--{key.replace('_', '-')}" + ("" if isinstance(value, bool) else f" {value}"))
    return out


def build_module(backbone: Backbone, args: argparse.Namespace, workdir: Path) -> OPDDistill:
    """An :class:`OPDDistill` with one random teacher adapter, outside a Trainer (``--cfg-free``: the
    student samples and trains at guidance 1, the teacher keeps 4.5; ``--merge-*``: the module's options)."""
    add_lora(backbone.transformer, "t", rank=32, alpha=64)
    with torch.no_grad():
        for p in lora_parameters(backbone.transformer, "t"):
            p.add_(0.01 * torch.randn_like(p))
    save_lora(backbone.transformer, "t", workdir / "teacher")
    backbone.transformer.delete_adapters("t")
    teachers = {"t": {"name": "t", "adapter": str(workdir / "teacher"), "prompts": [{"prompt": f"prompt {i}"}
                for i in range(64)], "guidance_scale": 4.5, "monitor_reward": None}}
    sampler = SimpleNamespace(kernel=args.kernel, noise_level=args.noise_level, num_steps=args.steps, shift=3.0,
                              guidance_scale=1.0 if getattr(args, "cfg_free", False) else 4.5)
    module = OPDDistill(lambda: backbone, teachers, OPDLoss(), sampler, torch.optim.AdamW, lora={"rank": 32, "alpha": 64},
                        prompts_per_teacher=args.batch, target_chunk=args.target_chunk, train_chunk=args.train_chunk,
                        merge_teacher_lora=getattr(args, "merge_teacher", False),
                        merge_rollout_lora=getattr(args, "merge_rollout", False))
    module.configure_model()
    module.to(backbone.device)  # outside a Trainer nothing else tells the module where its noise belongs
    module.manual_backward = lambda loss: loss.backward()  # type: ignore[method-assign]
    return module


def build(args: argparse.Namespace, device: str, dtype: torch.dtype) -> OPDDistill:
    """A fresh module for ``args`` with its module-level levers applied (checkpointing, FP8, compile);
    seeded by ``--seed``, so the baseline and every lever start from the same weights and adapters."""
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        module = build_module(build_backbone(args.model, device, dtype), args, Path(tmp))
    transformer = module.backbone.transformer
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(transformer)
    if args.fp8:
        enable_fp8(transformer)
    if args.compile:
        compile_blocks(transformer, backend=args.compile_backend, mode=args.compile_mode)
    return module


def release() -> None:
    """Free a discarded module's memory before the next one is built (GPU caches included)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class PhaseClock:
    """Wall-clock seconds per phase (rollout, targets, train). A phase timed inside another is taken
    out of the outer one, so the phases add up to the time measured. With ``sync`` (a GPU) every
    boundary waits for the device, so queued kernels are charged to the phase that launched them;
    that costs the overlap of one phase's tail with the next one's launch."""

    def __init__(self, sync: bool = False) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._sync: Callable[[], None] = torch.cuda.synchronize if sync else (lambda: None)
        self._open: list[str] = []

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        self._open.append(phase)
        try:
            yield
        finally:
            self._sync()
            self._open.pop()
            took = time.perf_counter() - start
            self.seconds[phase] += took
            if self._open:
                self.seconds[self._open[-1]] -= took

    @contextlib.contextmanager
    def calls(self, obj: Any, method: str, phase: str) -> Iterator[None]:
        """Time every call of ``obj.method`` as ``phase`` within the body (an instance attribute
        shadows the method meanwhile), e.g. the teacher targets inside ``distill_on``."""
        inner = getattr(obj, method)

        def timed(*a: Any, **kw: Any) -> Any:
            with self(phase):
                return inner(*a, **kw)

        setattr(obj, method, timed)
        try:
            yield
        finally:
            delattr(obj, method)


def reference_step(module: OPDDistill, traj: Trajectory, teacher: Teacher, j: int,
                   clock: PhaseClock | None = None) -> Tensor:
    """Step ``j`` of the authors' loop: one teacher pass, then one student pass, for the whole batch."""
    clock = clock or PhaseClock()
    b, x = traj.latents.shape[0], traj.latents[:, j]
    s, sn = traj.sigmas[j].expand(b), traj.sigmas[j + 1].expand(b)
    with clock("targets"):
        target, _ = module.means(x, s, sn, traj.cond, teacher.adapter_name, teacher.guidance_scale)
    with clock("train"):
        mean, std = module.means(x, s, sn, traj.cond, module.STUDENT, module.sampler.guidance_scale)
        return module.objective(mean, target, std, s - sn)[0]


def reference_loss(module: OPDDistill, traj: Trajectory, teacher: Teacher) -> Tensor:
    """``module``'s objective computed as the authors' script does: step by step, one teacher and one
    student pass per step for the whole batch, summed in one graph. The test that the module's
    batched :meth:`~opd.modules.distill.OPDDistill.distill_on` (and :func:`reference_backward`) give
    the same loss and gradient; a backward of this sum holds every step's activations at once."""
    total = torch.zeros((), device=module.device)
    for j in range(module.num_trained_steps):
        total = total + reference_step(module, traj, teacher, j)
    return total


def reference_backward(module: OPDDistill, traj: Trajectory, teacher: Teacher,
                       clock: PhaseClock | None = None) -> Tensor:
    """The authors' loop as the benchmark times it: :func:`reference_loss`'s steps, each
    backpropagated as soon as it is computed (gradients accumulate to those of the sum), so one
    step's activations are alive at a time, as in their script. Returns the summed loss, detached."""
    clock = clock or PhaseClock()
    total = torch.zeros((), device=module.device)
    for j in range(module.num_trained_steps):
        loss = reference_step(module, traj, teacher, j, clock)
        with clock("train"):
            module.manual_backward(loss)
        total = total + loss.detach()
    return total


def iteration(module: OPDDistill, opt: torch.optim.Optimizer, prompts: list[str], batched: bool,
              ref_batch: int, clock: PhaseClock | None = None) -> None:
    """One distillation iteration over ``prompts`` (rollout, targets, student update), timed by phase."""
    clock = clock or PhaseClock()
    teacher = module.teachers[0]
    chunks = [prompts] if batched else [prompts[i : i + ref_batch] for i in range(0, len(prompts), ref_batch)]
    with torch.autocast(module.backbone.device.type, dtype=torch.bfloat16, enabled=module.backbone.device.type == "cuda"):
        for chunk in chunks:
            with clock("rollout"):
                traj = module.rollout_student(chunk)
            if batched:
                with clock("train"), clock.calls(module, "teacher_targets", "targets"):
                    module.distill_on(traj, teacher, backward=True)
            else:
                reference_backward(module, traj, teacher, clock)
    with clock("train"):
        opt.step()
        opt.zero_grad(set_to_none=True)


def measure(module: OPDDistill, opt: torch.optim.Optimizer, batched: bool, args: argparse.Namespace,
            count_flops: bool = False, batch: int | None = None) -> dict[str, Any]:
    """Seconds per iteration over ``args.iters`` timed iterations after one warm-up iteration (which,
    with ``count_flops``, also counts the iteration's model FLOPs with torch's FLOP counter), split
    into ``rollout_seconds``, ``targets_seconds`` and ``train_seconds``; peak memory on a GPU (else
    ``None``). ``batch`` (default ``--batch``) trajectories per iteration, under ``--attention``."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = batch or args.batch
    prompts = [f"prompt {i}" for i in range(batch)]
    cuda = torch.cuda.is_available()
    out: dict[str, Any] = {"batch": batch}
    clock = PhaseClock(sync=cuda)
    module.encode([*prompts, ""])  # embeddings are cached in training: their one-off encoding is no iteration's
    with attention_backend(getattr(args, "attention", "default")):
        with FlopCounterMode(display=False) if count_flops else contextlib.nullcontext() as counter:
            iteration(module, opt, prompts, batched, args.ref_batch)
        if count_flops:
            out["flops_per_iteration"] = float(counter.get_total_flops())
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.iters):
            iteration(module, opt, prompts, batched, args.ref_batch, clock)
        if cuda:
            torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.iters
    out.update(seconds_per_iteration=seconds, trajectories_per_second=batch / seconds,
               **{f"{p}_seconds": clock.seconds[p] / args.iters for p in PHASES},
               peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)
    return out


def add_rates(fig: dict[str, Any], flops: float | None, peak: float | None) -> dict[str, Any]:
    """``achieved_tflops`` (model FLOPs per second: a lever that recomputes, e.g. checkpointing, is
    not credited for its extra FLOPs) and ``mfu`` (against the measured bf16 peak; ``None`` on a CPU)."""
    fig["achieved_tflops"] = flops / fig["seconds_per_iteration"] / 1e12 if flops else None
    fig["mfu"] = fig["achieved_tflops"] / peak if flops and peak else None
    return fig


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


def measure_lever(name: str, plain: argparse.Namespace, device: str, dtype: torch.dtype, ours: dict[str, Any],
                  reference: dict[str, Any], peak: float | None) -> dict[str, Any]:
    """Lever ``name`` alone on a fresh module, against the plain module (``ours``) and the
    reference-style CFG loop. A lever this machine cannot run (FP8 without an FP8 GPU, an attention
    backend without a kernel here, out of memory) gets ``skipped`` or ``error`` instead of figures."""
    flags = lever_flags(name, plain)
    args = with_flags(plain, **flags)
    if args.fp8 and not fp8_supported(device):
        return {"flags": flags, "skipped": f"FP8 needs a CUDA GPU of compute capability 8.9 or newer, not {device}"}
    module = opt = None
    try:
        module = build(args, device, dtype)
        opt = torch.optim.AdamW(module.policy_parameters(), lr=1e-5)
        fig = measure(module, opt, True, args, count_flops=args.cfg_free)  # others: the plain module's math
    except (RuntimeError, ValueError, NotImplementedError) as err:
        return {"flags": flags, "error": f"{type(err).__name__}: {err}"[:1000]}
    finally:
        del module, opt
        if args.compile:
            torch._dynamo.reset()
        release()
    add_rates(fig, fig.get("flops_per_iteration") or ours.get("flops_per_iteration"), peak)
    fig.update(flags=flags, speedup_vs_ours=fig["trajectories_per_second"] / ours["trajectories_per_second"],
               speedup_vs_reference=fig["trajectories_per_second"] / reference["trajectories_per_second"])
    return fig


def batch_sweep(args: argparse.Namespace, device: str, dtype: torch.dtype, sizes: list[int], peak: float | None,
                entries: list[dict[str, Any]], report: Callable[[], None]) -> None:
    """Ours at each batch size in ``sizes`` on one module, appended to ``entries`` (reported after
    each); stops at the first size that runs out of GPU memory (larger ones would too)."""
    module = build(args, device, dtype)
    opt = torch.optim.AdamW(module.policy_parameters(), lr=1e-5)
    try:
        for size in sizes:
            try:
                fig = measure(module, opt, True, args, count_flops=not args.compile, batch=size)
            except torch.cuda.OutOfMemoryError:
                opt.zero_grad(set_to_none=True)
                entries.append({"batch": size, "error": "out of memory"})
                report()
                return
            entries.append(add_rates(fig, fig.get("flops_per_iteration"), peak))
            report()
    finally:
        del module, opt
        release()


def parse_args(argv: list[str] | None, device: str) -> argparse.Namespace:
    cuda = device == "cuda"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd35m-random" if cuda else "mini", choices=["sd35m-random", "sd3-tiny", "mini"])
    parser.add_argument("--batch", type=int, default=24 if cuda else 6, help="trajectories per iteration (ours)")
    parser.add_argument("--ref-batch", type=int, default=3, help="the reference script's batch")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--kernel", default="ode")
    parser.add_argument("--noise-level", type=float, default=0.0)
    parser.add_argument("--target-chunk", type=int, default=64)
    parser.add_argument("--train-chunk", type=int, default=16)
    parser.add_argument("--iters", type=int, default=3, help="timed iterations after one warm-up")
    parser.add_argument("--seed", type=int, default=0, help="weights and adapters of every module built")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here (after every stage)")
    levers = parser.add_argument_group("levers beyond batching (ours only; the reference-style loop stays plain)")
    levers.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    levers.add_argument("--compile-backend", default="inductor", help="torch.compile backend (--compile, --levers)")
    levers.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    levers.add_argument("--merge-teacher", action="store_true", help="teacher LoRA merged for its target passes")
    levers.add_argument("--merge-rollout", action="store_true", help="student LoRA merged for its rollouts")
    levers.add_argument("--attention", default="default", choices=ATTENTION_BACKENDS, help="torch SDPA backend")
    levers.add_argument("--gradient-checkpointing", action="store_true", help="recompute block activations in backward")
    levers.add_argument("--fp8", action="store_true", help="FP8 matmuls for the frozen base (GPU of sm 8.9+)")
    levers.add_argument("--cfg-free", action="store_true", help="student samples and trains at guidance 1")
    parser.add_argument("--levers", nargs="*", choices=LEVERS, default=None, metavar="LEVER",
                        help=f"measure the plain module, then each lever alone (default all: {', '.join(LEVERS)})")
    parser.add_argument("--batch-sweep", nargs="+", type=int, default=None, metavar="B",
                        help="also measure ours at each of these batch sizes (trajectories/s against batch)")
    args = parser.parse_args(argv)
    if args.levers is not None and levers_on(args):
        parser.error(f"--levers measures each lever alone against the plain module: drop {', '.join(levers_on(args))}")
    if args.fp8 and not fp8_supported(device):
        parser.error(f"--fp8 needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper); this run is on {device}")
    if args.batch_sweep and min(args.batch_sweep) < 1:
        parser.error(f"--batch-sweep: batch sizes must be positive, got {args.batch_sweep}")
    for flag in ("batch", "ref_batch", "steps", "target_chunk", "train_chunk", "iters"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    args = parse_args(argv, device)
    result: dict[str, Any] = {"device": torch.cuda.get_device_name() if cuda else "cpu", "model": args.model,
                              "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()}}

    def report(stage: str, shown: Any = None) -> None:  # written after every stage: a run cut short keeps what it measured
        print(f"[bench] {stage}: {json.dumps(result.get(stage) if shown is None else shown)}", flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2))

    peak = result["matmul_peak_tflops"] = matmul_peak_tflops(device)
    report("matmul_peak_tflops")
    plain = with_flags(args, **PLAIN)
    ours_args = args if args.levers is None else plain
    # the reference-style loop first: it is eager and quick, so a run cut short by a time limit (compile's
    # warm-up can take minutes) still has the denominator of every speed-up
    module = build(plain, device, dtype)
    result["student_lora_parameters"] = sum(p.numel() for p in module.policy_parameters())
    opt = torch.optim.AdamW(module.policy_parameters(), lr=1e-5)
    ref = result["reference_style"] = measure(module, opt, False, plain, count_flops=True)
    add_rates(ref, ref["flops_per_iteration"], peak)
    report("reference_style")
    if levers_on(ours_args):  # ours runs a fresh module with its levers (the reference loop: the plain one)
        del module, opt
        release()
        module = build(ours_args, device, dtype)
        opt = torch.optim.AdamW(module.policy_parameters(), lr=1e-5)
    ours = result["ours"] = measure(module, opt, True, ours_args, count_flops=not ours_args.compile)
    ours["levers"] = levers_on(ours_args)
    del module, opt
    release()
    flops = ours.get("flops_per_iteration")
    if flops is None and not ours_args.cfg_free:  # compiled: credited with the plain module's count (the
        flops = ref["flops_per_iteration"]  # other levers change how, not what, is computed)
    add_rates(ours, flops, peak)
    result["speedup"] = ours["trajectories_per_second"] / ref["trajectories_per_second"]
    report("ours")
    if args.batch_sweep:  # before the levers, whose last (compile) may not finish in a time-limited run
        result["batch_sweep"] = []
        batch_sweep(ours_args, device, dtype, args.batch_sweep, peak, result["batch_sweep"],
                    lambda: report("batch_sweep", result["batch_sweep"][-1]))
    if args.levers is not None:
        result["levers"] = {}
        for name in args.levers or LEVERS:
            result["levers"][name] = measure_lever(name, plain, device, dtype, ours, ref, peak)
            report("levers", {name: result["levers"][name]})
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
