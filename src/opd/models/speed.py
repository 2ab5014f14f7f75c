"""Throughput levers beyond batching (issue 18), each a small switch that ``python -m opd.bench``
measures alone and a test holds to the same loss and gradients (docs/bench/README.md).

- :func:`merged_lora`: one LoRA merged into the base weights for no-grad passes (teacher targets,
  rollouts), so a forward runs one matmul per projection instead of the base's plus two thin LoRA ones;
- :func:`compile_blocks`: regional ``torch.compile`` of each transformer block;
- :func:`attention_backend`: pin torch's SDPA backend (flash, memory-efficient, cuDNN, math);
- :func:`enable_gradient_checkpointing`: recompute block activations in backward, so that larger
  training chunks fit;
- :func:`enable_fp8`: FP8 (e4m3) matmuls for the frozen base's linear layers (GPUs of compute
  capability 8.9 or newer; never a default).

None of them changes what is computed, only how; merging and FP8 change the rounding (see each).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from opd.models.lora import active_adapter

#: ``--attention`` names → torch's SDPA backends (``default`` lets torch choose per call)
ATTENTION_BACKENDS = ("default", "flash", "efficient", "cudnn", "math")
#: the largest finite float8 e4m3 value: amax is scaled onto it
FP8_MAX = 448.0


# -- merged LoRA -------------------------------------------------------------------------------
def _lora_layers(transformer: nn.Module, name: str) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    layers = {n: m for n, m in transformer.named_modules() if isinstance(m, LoraLayer) and name in m.lora_A}
    if not layers:
        raise ValueError(f"merged_lora: the transformer has no LoRA adapter {name!r}")
    return layers


def _merged_weight(layer: Any, name: str, module: str) -> Tensor:
    """``W + scale · B A`` in float32, rounded once to ``W``'s dtype (plain LoRA on a linear layer only)."""
    base = layer.get_base_layer()
    if not isinstance(base, nn.Linear):
        raise TypeError(f"merged_lora: {module} is a {type(base).__name__}; only linear layers merge here")
    if (name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name)
            or getattr(layer, "lora_bias", {}).get(name)):
        raise ValueError(f"merged_lora: adapter {name!r} at {module} is not plain LoRA (DoRA, a variant or a "
                         "LoRA bias); it cannot be merged by this helper")
    with torch.no_grad(), torch.autocast(base.weight.device.type, enabled=False):  # autocast would make B A bf16
        delta = layer.lora_B[name].weight.float() @ layer.lora_A[name].weight.float()
        if layer.fan_in_fan_out:
            delta = delta.T
        return (base.weight.float() + layer.scaling[name] * delta).to(base.weight.dtype)


@contextmanager
def merged_lora(transformer: nn.Module, name: str, trainable: str | None = None) -> Iterator[None]:
    """Run the body with adapter ``name`` merged into the base weights and every adapter disabled,
    so a forward is the base architecture at ``W + scale · B A``: one matmul per projection instead
    of the base matmul plus the LoRA's two (for a rank-32 LoRA these are thin, memory-bound matmuls
    and separate kernel launches). For no-grad passes only: the adapter's factors get no gradient
    inside, and ``W`` is frozen.

    The merge is computed in float32 and rounded once to the base's dtype; in bf16 that rounding is
    relative to each weight, so a delta far below the weights' resolution (a student LoRA early in
    training) is partly lost, where the unmerged path adds it to the activations. Costs, per entry:
    one extra copy of the adapted base weights (the originals are kept aside, not recomputed, so
    they come back bit for bit on exit) and a ``B @ A`` per adapted layer. On exit the adapters'
    previous state returns and exactly ``trainable`` requires grad (as :func:`active_adapter`).
    """
    layers = _lora_layers(transformer, name)
    merged = {n: _merged_weight(layer, name, n) for n, layer in layers.items()}  # all checked before any swap
    originals: dict[str, Tensor] = {}
    with active_adapter(transformer, None, trainable=trainable):
        try:
            for n, layer in layers.items():
                weight = layer.get_base_layer().weight
                originals[n] = weight.data
                weight.data = merged.pop(n)
            yield
        finally:
            for n, data in originals.items():
                layers[n].get_base_layer().weight.data = data


# -- regional compilation -----------------------------------------------------------------------
def transformer_blocks(transformer: nn.Module) -> list[nn.Module]:
    """The repeated blocks of an MMDiT (``transformer_blocks``; Flux-style models also
    ``single_transformer_blocks``)."""
    blocks = [b for attr in ("transformer_blocks", "single_transformer_blocks")
              for b in getattr(transformer, attr, None) or ()]
    if not blocks:
        raise ValueError(f"{type(transformer).__name__} has no transformer_blocks to compile")
    return blocks


def compile_blocks(transformer: nn.Module, backend: str = "inductor", mode: str | None = None,
                   recompile_limit: int = 64) -> int:
    """Compile each transformer block in place with ``torch.compile`` (regional compilation: one
    block's graph is traced once and reused by every block of the same class, so compile time is
    that of a block, not of the whole model); returns the number of blocks.

    Parameter names are unchanged (``nn.Module.compile`` wraps the forward, not the module), so
    LoRA adapters, optimisers and checkpoints see the same model. Costs: compile time on the first
    call of every distinct graph (grad or no grad, which adapter is active or disabled, and the
    batch shapes: rollout, target and training chunks), paid in the bench's warm-up iteration;
    dynamo's recompile limit (a process-wide setting) is raised to ``recompile_limit`` so that these
    few variants do not fall back to eager."""
    config = torch._dynamo.config
    for key in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(config, key):
            setattr(config, key, max(getattr(config, key), recompile_limit))
            break
    blocks = transformer_blocks(transformer)
    for block in blocks:
        block.compile(backend=backend, mode=mode)
    return len(blocks)


# -- attention backend --------------------------------------------------------------------------
def attention_backend(name: str) -> Any:
    """A context manager that restricts ``F.scaled_dot_product_attention`` (diffusers' SD3 attention
    processor calls it) to one backend: ``flash`` (FlashAttention-2, bf16/fp16 on a GPU; also a CPU
    kernel), ``efficient`` (memory-efficient, GPU), ``cudnn`` (cuDNN, GPU), ``math`` (the reference
    composition of matmuls and softmax: slow, it materialises the attention matrix); ``default``
    leaves torch's choice per call. A backend that cannot run the call raises at the call."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {name!r}")
    if name == "default":
        return nullcontext()
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]
    return sdpa_kernel([backend])


# -- activation checkpointing -------------------------------------------------------------------
def enable_gradient_checkpointing(transformer: nn.Module) -> None:
    """Recompute each block's activations in backward instead of keeping them (diffusers'
    ``enable_gradient_checkpointing``): activation memory per training chunk drops to about one
    block's, for roughly one more forward of compute per backward. It pays only when the memory it
    frees buys a larger ``train_chunk``. No-grad passes (rollouts, teacher targets) are unaffected."""
    if not getattr(transformer, "_supports_gradient_checkpointing", False):
        raise ValueError(f"{type(transformer).__name__} does not support gradient checkpointing")
    transformer.enable_gradient_checkpointing()


# -- FP8 matmuls ----------------------------------------------------------------------------------
def fp8_supported(device: torch.device | str) -> bool:
    """FP8 tensor-core matmuls (``torch._scaled_mm``) need a CUDA GPU of compute capability 8.9+
    (Ada, Hopper, Blackwell)."""
    device = torch.device(device)
    return (device.type == "cuda" and torch.cuda.is_available() and hasattr(torch, "float8_e4m3fn")
            and torch.cuda.get_device_capability(device) >= (8, 9))


def to_fp8(t: Tensor) -> tuple[Tensor, Tensor]:
    """``t`` as float8 e4m3 with one float32 scale for the whole tensor (``t ≈ q · scale``)."""
    scale = (t.detach().abs().amax().float() / FP8_MAX).clamp(min=1e-12)
    q = (t.detach().float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


class _FP8Matmul(torch.autograd.Function):
    """``x @ Wᵀ`` with both operands in float8 (per-tensor scales, float32 accumulation); backward
    gives ``x`` its gradient through the full-precision ``W`` (frozen: no weight gradient)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, w8: Tensor, w_scale: Tensor) -> Tensor:
        ctx.save_for_backward(weight)
        x8, x_scale = to_fp8(x.reshape(-1, x.shape[-1]))
        y = torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=x.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (weight,) = ctx.saved_tensors
        return grad @ weight.to(grad.dtype), None, None, None


class FP8Linear(nn.Linear):
    """A frozen ``nn.Linear`` whose matmul runs in FP8 (:func:`enable_fp8` swaps the class of existing
    layers, so parameters, names and LoRA wrappers stay as they are). The weight is quantised once
    and re-quantised whenever its storage changes (e.g. inside :func:`merged_lora`); activations
    are quantised per call. Runs in the autocast dtype when autocast is on, else the weight's."""

    def forward(self, x: Tensor) -> Tensor:
        if self.weight.requires_grad:
            raise RuntimeError("FP8Linear: the weight requires grad; FP8 is for the frozen base only")
        key = (self.weight.data_ptr(), self.weight._version)
        if getattr(self, "_fp8_key", None) != key:
            self._fp8_weight, self._fp8_scale = to_fp8(self.weight)
            self._fp8_key = key
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.weight.dtype
        with torch.autocast(device, enabled=False):
            y = _FP8Matmul.apply(x.to(dtype), self.weight, self._fp8_weight, self._fp8_scale)
            return y if self.bias is None else y + self.bias.to(dtype)


def fp8_eligible(name: str, module: nn.Module) -> bool:
    """A block's frozen linear layer whose matmul FP8 can take: not a LoRA factor, not an adaLN
    modulation (``norm*``: a handful of rows, where quantisation error would scale every token),
    both dimensions multiples of 16 (``_scaled_mm``'s requirement)."""
    parts = name.split(".")
    return (type(module) is nn.Linear and not any(p.startswith(("lora_", "norm")) for p in parts)
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def enable_fp8(transformer: nn.Module) -> list[str]:
    """Switch the frozen base's eligible linear layers inside the transformer blocks (attention
    projections and feed-forwards, :func:`fp8_eligible`) to :class:`FP8Linear`; returns their names.

    Per-tensor e4m3 scaling keeps about two significant digits per element, so outputs move by
    around a percent: a speed lever to measure, never a default. Costs one float8 copy of each
    converted weight (a quarter of fp32, half of bf16) and a quantisation pass over each input.
    The bench enables it only where :func:`fp8_supported`; ``torch._scaled_mm`` also runs on some CPUs."""
    names = []
    for b, block in enumerate(transformer_blocks(transformer)):
        for n, m in block.named_modules():
            if fp8_eligible(n, m):
                m.__class__ = FP8Linear
                names.append(f"block{b}.{n}")
    return names


def disable_fp8(transformer: nn.Module) -> None:
    """Undo :func:`enable_fp8` (the layers become plain ``nn.Linear`` again, their float8 copies dropped)."""
    for m in transformer.modules():
        if type(m) is FP8Linear:
            m.__class__ = nn.Linear
            for attr in ("_fp8_weight", "_fp8_scale", "_fp8_key"):
                m.__dict__.pop(attr, None)
