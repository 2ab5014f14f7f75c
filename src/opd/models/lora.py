"""LoRA adapters on the backbone's transformer (peft through diffusers' adapter mixin).

One backbone carries the trainable student adapter and any number of frozen teacher adapters;
disabling all adapters gives the reference model. Saved adapters are diffusers LoRA files
(``pytorch_lora_weights.safetensors`` with ``transformer.``-prefixed keys and the LoRA config in
the metadata), so ``StableDiffusion3Pipeline.load_lora_weights`` reads them.

:func:`load_lora` (teachers, evaluation checkpoints, ``init_adapter``) reads the diffusers and the PEFT
layouts (Flow-GRPO's and DiffusionNFT's checkpoints) through :mod:`opd.models.lora_files`, which finds,
reads and converts adapter files; this module puts them on a transformer and checks that they fit.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from opd.models.lora_files import (  # noqa: F401 — the file side, importable from here as before
    PEFT_CONFIG_NAME,
    PEFT_WEIGHT_NAME,
    WEIGHT_NAME,
    LoraWeights,
    convert_lora,
    read_lora,
    resolve_lora_file,
)

log = logging.getLogger(__name__)

#: the references' targets: every attention projection of both MMDiT streams
DEFAULT_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                   "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")

def add_lora(transformer: nn.Module, name: str, rank: int = 32, alpha: float = 64,
             target_modules: Sequence[str] = DEFAULT_TARGETS, init: str | bool = "gaussian",
             dtype: torch.dtype | None = None) -> None:
    """Add a trainable adapter ``name``; ``init="gaussian"`` draws A and zeroes B, so the adapted
    model starts equal to the base.

    ``dtype``: the adapter's parameter dtype; ``None`` keeps peft's choice, the base layers' dtype.
    The training modules pass ``torch.float32`` (:func:`cast_lora`), so that on a bf16/fp16 backbone
    the trainable weights, their gradients and the optimiser state are fp32 (docs/precision.md)."""
    from peft import LoraConfig

    if name in adapter_names(transformer):
        raise ValueError(f"adapter {name!r} already exists on the transformer")
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init, target_modules=list(target_modules))
    transformer.add_adapter(config, adapter_name=name)
    transformer.set_adapter(name)
    if dtype is not None:
        cast_lora(transformer, name, dtype)


def cast_lora(transformer: nn.Module, name: str, dtype: torch.dtype) -> None:
    """Cast adapter ``name``'s parameters to ``dtype`` in place, leaving the rest of the transformer
    (frozen base, other adapters) as it is: diffusers' ``cast_training_params`` for one adapter.
    The ``Parameter`` objects stay the same (their ``.data`` is replaced), so an optimiser built on
    them still holds them (cast before it has state: moments are made in the parameters' dtype);
    parameters already in ``dtype`` are not touched.

    peft casts a new adapter to its base layer's dtype (A's gaussian draw is therefore rounded to
    that dtype once); peft's LoRA forward casts its input to the adapter's dtype, so an fp32 adapter
    on a bf16 base runs, and under ``torch.autocast`` its matmuls take bf16 inputs."""
    for p in lora_parameters(transformer, name):
        if p.dtype != dtype:
            p.data = p.data.to(dtype)


def lora_dtypes(transformer: nn.Module, name: str) -> set[torch.dtype]:
    """The dtypes of adapter ``name``'s parameters (one, unless something cast part of it)."""
    return {p.dtype for p in lora_parameters(transformer, name)}


def adapter_names(transformer: nn.Module) -> list[str]:
    config = getattr(transformer, "peft_config", None) or {}
    return list(config)


def lora_parameters(transformer: nn.Module, name: str) -> list[nn.Parameter]:
    """The parameters of adapter ``name`` (for the optimiser)."""
    return [p for n, p in transformer.named_parameters() if "lora_" in n and f".{name}." in n]


def set_trainable(transformer: nn.Module, name: str | None) -> None:
    """Exactly the parameters of adapter ``name`` require grad (``None``: nothing does)."""
    for n, p in transformer.named_parameters():
        p.requires_grad_(name is not None and "lora_" in n and f".{name}." in n)


@contextmanager
def active_adapter(transformer: nn.Module, name: str | None, trainable: str | None = None) -> Iterator[None]:
    """Run the body with adapter ``name`` active (``None``: all adapters disabled = reference).

    peft's ``set_adapter`` also flips ``requires_grad``; afterwards only ``trainable`` requires
    grad again, so switching to a frozen teacher never unfreezes it nor freezes the student.
    """
    previous = list(transformer.active_adapters()) if adapter_names(transformer) else []
    try:
        if name is None:
            transformer.disable_adapters()
        else:
            transformer.enable_adapters()
            transformer.set_adapter(name)
        yield
    finally:
        if previous:
            transformer.enable_adapters()
            transformer.set_adapter(previous if len(previous) > 1 else previous[0])
        set_trainable(transformer, trainable)


def save_lora(transformer: nn.Module, name: str, directory: str | Path) -> Path:
    """Write adapter ``name`` as a diffusers LoRA file; returns the file path."""
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    directory = Path(directory)
    state = get_peft_model_state_dict(transformer, adapter_name=name)
    metadata = transformer.peft_config[name].to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])
    StableDiffusion3Pipeline.save_lora_weights(str(directory), transformer_lora_layers=state,
                                               transformer_lora_adapter_metadata=metadata)
    return directory / WEIGHT_NAME



def _module_scale(config: Any, module: str) -> tuple[int, float]:
    """(rank, scale) peft gives ``module`` under ``config`` (``rank_pattern``, ``alpha_pattern``, rsLoRA)."""
    from peft.utils.other import get_pattern_key

    r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
    return int(r), alpha / (math.sqrt(r) if config.use_rslora else r)


def _adaptable(transformer: nn.Module) -> dict[str, nn.Module]:
    """Module name → the layer a LoRA there wraps or would wrap."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for n, m in transformer.named_modules():
        parts = n.split(".")
        if any(p.startswith("lora_") for p in parts) or "base_layer" in parts:
            continue
        if isinstance(m, BaseTunerLayer):
            out[n] = m.get_base_layer()
        elif isinstance(m, nn.Linear | nn.Conv2d):
            out[n] = m
    return out


def _adapted_layers(transformer: nn.Module, name: str) -> dict[str, Any]:
    """Module name → LoRA layer, for the layers that carry adapter ``name``."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in transformer.named_modules() if isinstance(m, LoraLayer) and name in m.lora_A}


def _check_fits(transformer: nn.Module, weights: LoraWeights) -> None:
    """Before loading: the weights' modules exist here with these shapes, and the config
    (``target_modules``, ranks) describes exactly these weights."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    file, modules, here = weights.file, weights.modules(), _adaptable(transformer)
    broken = sorted(m for m, (a, b) in modules.items() if a is None or b is None or a[0] != b[1])
    if broken:
        raise ValueError(f"LoRA adapter {file} is damaged: lora_A and lora_B of {broken[:3]} are missing "
                         "or of different ranks; re-export it")
    lacking = sorted(set(modules) - set(here))
    if lacking:
        raise ValueError(f"LoRA adapter {file} has weights for {len(lacking)} module(s) this transformer "
                         f"lacks (e.g. {lacking[:3]}): it was made for another base model; use one trained "
                         "on this one")
    for m, (a, b) in sorted(modules.items()):
        layer = here[m]
        if isinstance(layer, nn.Linear) and (a[1], b[0]) != (layer.in_features, layer.out_features):
            raise ValueError(f"LoRA adapter {file} does not fit this model: {m} maps {layer.in_features}→"
                             f"{layer.out_features} features here, the adapter {a[1]}→{b[0]}: it was made "
                             "for another base model")
    if weights.config is None:
        return
    config = LoraConfig(**weights.config)
    other_weights = "the config belongs to other weights: put the config saved with these weights beside them"
    if config.target_modules is not None and config.target_modules != "all-linear":
        targeted = {m for m in here if check_target_module_exists(config, m)}
        extra, missing = sorted(set(modules) - targeted), sorted(targeted - set(modules))
        said = [f"weights for {len(extra)} module(s) target_modules does not name (e.g. {extra[:3]})"
                for _ in extra[:1]]
        said += [f"no weights for {len(missing)} module(s) target_modules names (e.g. {missing[:3]})"
                 for _ in missing[:1]]
        if said:
            raise ValueError(f"LoRA adapter {file} does not match its config {weights.source}: "
                             f"{'; '.join(said)}; {other_weights}")
    for m, (a, _) in sorted(modules.items()):
        r, _ = _module_scale(config, m)
        if a[0] != r:
            raise ValueError(f"LoRA adapter {file} has rank {a[0]} at {m} but its config {weights.source} "
                             f"says r={r} there (r, rank_pattern): {other_weights}")


def load_lora(transformer: nn.Module, path: str | Path, name: str) -> None:
    """Load the adapter at ``path`` (diffusers or PEFT layout, see the module doc) as a frozen
    adapter ``name``.

    Fails clearly on an unreadable file, on an adapter made for another architecture (modules or
    shapes that do not fit this transformer), on a config that does not describe the weights
    (targets, ranks), and if the loaded factors or scales differ from the saved ones (the adapter
    is then removed again).
    """
    weights = read_lora(path)
    _check_fits(transformer, weights)
    file = weights.file
    previous = list(transformer.active_adapters()) if adapter_names(transformer) else []
    # the factors come from the file: no initialisation that reads or changes the base weights (PiSSA, LoftQ…)
    config = None if weights.config is None else {**weights.config, "init_lora_weights": True}
    # diffusers converts a state dict whose first key lacks "lora_A" from the old LoRA layout: lead with one
    state = dict(sorted(weights.state.items(), key=lambda kv: ".lora_A." not in kv[0]))
    try:
        transformer.load_lora_adapter(state, prefix=None, adapter_name=name, metadata=config)
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"LoRA adapter {file} does not fit this model (made for another base model?): "
                         f"{err}") from err
    try:
        _check_loaded(transformer, weights, name)
    except RuntimeError:
        transformer.delete_adapters(name)
        raise
    finally:
        if previous:
            transformer.set_adapter(previous if len(previous) > 1 else previous[0])
    if weights.config is None:
        log.warning("LoRA adapter %s carries no LoRA config: loaded with alpha = r (scale 1) per module",
                    file)
    for n, p in transformer.named_parameters():
        if f".{name}." in n:
            p.requires_grad_(False)


def _check_loaded(transformer: nn.Module, weights: LoraWeights, name: str) -> None:
    """After loading: every factor of the file is in adapter ``name`` unchanged, and each layer's
    scale is the saved ``lora_alpha / r`` (diffusers takes alpha = r whenever it misses the config)."""
    from peft import LoraConfig

    params = dict(transformer.named_parameters())
    for key, value in weights.state.items():
        module, _, rest = key.rpartition(".lora_")
        if rest not in ("A.weight", "B.weight"):
            continue
        param = params.get(f"{module}.lora_{rest[0]}.{name}.weight")
        if param is None or not torch.equal(param.detach().cpu(), value.to(param.dtype)):
            raise RuntimeError(f"LoRA adapter {weights.file}: {key} did not load into adapter {name!r}; the "
                               "adapter does not fit this transformer")
    if weights.config is None:
        return
    config = LoraConfig(**weights.config)
    for module in weights.modules():
        layer = transformer.get_submodule(module)
        r, want = _module_scale(config, module)
        got = layer.scaling[name]
        if layer.r[name] != r or not math.isclose(got, want, rel_tol=1e-6):
            raise RuntimeError(f"LoRA adapter {weights.file} was saved with r={r}, scale {want:g} at "
                               f"{module} ({weights.source}) but loaded as r={layer.r[name]}, scale {got:g}")


def copy_lora(transformer: nn.Module, path: str | Path, name: str) -> None:
    """Start adapter ``name`` from the LoRA adapter at ``path`` (e.g. the next stage of cascade RL).

    The adapter is loaded as a temporary one and its weights are copied into ``name``, which must
    have the same targets, ranks and scales; anything else fails with a message saying which.
    """
    scratch = f"{name}_init"
    load_lora(transformer, path, scratch)
    try:
        mine, theirs = transformer.peft_config[name], transformer.peft_config[scratch]
        if (mine.r, mine.lora_alpha) != (theirs.r, theirs.lora_alpha):
            raise ValueError(f"init adapter {path} has rank {theirs.r}, alpha {theirs.lora_alpha}; the new "
                             f"adapter has rank {mine.r}, alpha {mine.lora_alpha}: set module.lora to match")
        source = {n.replace(f".{scratch}.", f".{name}."): p for n, p in transformer.named_parameters()
                  if f".{scratch}." in n}
        target = {n: p for n, p in transformer.named_parameters() if f".{name}." in n}
        if source.keys() != target.keys():
            raise ValueError(f"init adapter {path} targets other modules than module.lora.target_modules")
        for n, p in target.items():
            if p.shape != source[n].shape:
                raise ValueError(f"init adapter {path} has shape {tuple(source[n].shape)} at "
                                 f"{n.replace(f'.{name}.', '.')}, the new adapter {tuple(p.shape)} (a "
                                 "rank_pattern?): set module.lora to match")
        for module, layer in _adapted_layers(transformer, name).items():
            if not math.isclose(layer.scaling[name], layer.scaling[scratch], rel_tol=1e-6):
                raise ValueError(f"init adapter {path} scales {module} by {layer.scaling[scratch]:g}, the "
                                 f"new adapter by {layer.scaling[name]:g} (an alpha_pattern?): set "
                                 "module.lora to match")
        for n, p in target.items():
            p.data.copy_(source[n].data)
    finally:
        transformer.delete_adapters(scratch)
        transformer.set_adapter(name)
