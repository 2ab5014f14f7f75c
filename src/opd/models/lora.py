"""LoRA adapters on the backbone's transformer (peft through diffusers' adapter mixin).

One backbone carries the trainable student adapter and any number of frozen teacher adapters;
disabling all adapters gives the reference model. Saved adapters are diffusers LoRA files
(``pytorch_lora_weights.safetensors`` with ``transformer.``-prefixed keys and the LoRA config in
the metadata), so ``StableDiffusion3Pipeline.load_lora_weights`` reads them.

:func:`load_lora` (teachers, evaluation checkpoints, ``init_adapter``) reads two layouts, told apart
by the keys of the safetensors file:

* diffusers: ``transformer.<module>.lora_A.weight`` (ours, ``save_lora_weights``), or bare
  ``<module>.lora_A.weight`` (a model's ``save_lora_adapter``); r and alpha from the file's
  ``lora_adapter_metadata`` (none: diffusers infers the ranks and takes alpha = r);
* PEFT: ``base_model.model.<module>.lora_A.weight`` in ``adapter_model.safetensors`` with r, alpha,
  ``rank_pattern``, ``alpha_pattern`` and ``target_modules`` from the ``adapter_config.json`` beside it:
  what ``PeftModel.save_pretrained`` writes, i.e. Flow-GRPO's and DiffusionNFT's
  ``checkpoints/checkpoint-N/lora`` folders.

An adapter path is either such a folder or the ``.safetensors`` file itself.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

#: the references' targets: every attention projection of both MMDiT streams
DEFAULT_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                   "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: what PEFT's ``save_pretrained`` writes (Flow-GRPO, DiffusionNFT)
PEFT_WEIGHT_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
_PREFIXES = {"transformer.": "diffusers", "base_model.model.": "peft"}
_PICKLED = ("pytorch_lora_weights.bin", "adapter_model.bin")
#: adapter_config.json fields that describe the run, not the adapter
_BOOKKEEPING = {"peft_type", "peft_version", "auto_mapping", "base_model_name_or_path", "revision",
                "task_type", "inference_mode", "init_lora_weights"}


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


def resolve_lora_file(path: str | Path) -> Path:
    """A LoRA folder or file → its safetensors file; errors name the path and what was expected.

    A folder holds ``pytorch_lora_weights.safetensors`` (diffusers, ours) or
    ``adapter_model.safetensors`` (PEFT ``save_pretrained``); a folder holding neither names any
    subfolder that does (Flow-GRPO's ``checkpoint-N`` keeps its adapter in ``checkpoint-N/lora``).
    """
    path = Path(path)
    if path.is_dir():
        for name in (WEIGHT_NAME, PEFT_WEIGHT_NAME):
            if (path / name).is_file():
                return path / name
        pickled = [n for n in _PICKLED if (path / n).is_file()]
        if pickled:
            raise FileNotFoundError(f"LoRA adapter not found: {path} holds {pickled[0]}, a pickled "
                                    f"checkpoint, not a safetensors file; "
                                    f"{_to_safetensors(path / pickled[0])}")
        nested = sorted({str(f.parent) for name in (WEIGHT_NAME, PEFT_WEIGHT_NAME)
                         for f in path.glob(f"*/{name}")})
        hint = f"; its subfolder(s) {', '.join(nested)} hold one: point at that folder" if nested else ""
        raise FileNotFoundError(f"LoRA adapter not found: {path} holds neither {WEIGHT_NAME} (diffusers / "
                                f"opd) nor {PEFT_WEIGHT_NAME} + {PEFT_CONFIG_NAME} (PEFT save_pretrained: "
                                f"Flow-GRPO, DiffusionNFT){hint}")
    if not path.is_file():
        raise FileNotFoundError(f"LoRA adapter not found: {path} (expected a folder holding {WEIGHT_NAME} or "
                                f"{PEFT_WEIGHT_NAME}, or the .safetensors file itself)")
    return path


def _to_safetensors(pickled: Path) -> str:
    return ("convert it once: python -c \"import torch, safetensors.torch as s; s.save_file(torch.load("
            f"'{pickled}', weights_only=True), '{pickled.with_suffix('.safetensors')}')\"")


@dataclass
class LoraWeights:
    """An adapter file, read and put in one layout whatever it was saved in.

    ``state``: the LoRA tensors keyed by the transformer's own module names
    (``transformer_blocks.0.attn.to_q.lora_A.weight``); ``config``: the ``LoraConfig`` fields
    (``None``: the file says nothing about r and alpha); ``source``: where ``config`` came from;
    ``layout``: ``"diffusers"`` or ``"peft"``."""
    file: Path
    layout: str
    state: dict[str, torch.Tensor]
    config: dict[str, Any] | None
    source: str

    def modules(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
        """module name → (shape of lora_A, shape of lora_B); a missing factor is ``None``."""
        out: dict[str, list] = {}
        for key, value in self.state.items():
            module, _, rest = key.rpartition(".lora_")
            if rest in ("A.weight", "B.weight"):
                out.setdefault(module, [None, None])["AB".index(rest[0])] = tuple(value.shape)
        return {m: (a, b) for m, (a, b) in out.items()}


def read_lora(path: str | Path) -> LoraWeights:
    """Read the adapter at ``path`` (folder or file, diffusers or PEFT layout; see the module doc).

    Fails, naming the file and the fix, on: no readable safetensors file, keys of no known layout
    (no transformer LoRA weights), non-LoRA weights, PEFT weights without their
    ``adapter_config.json``, and a config whose r / alpha / patterns are not positive numbers or
    which asks for more than LoRA factors.
    """
    from safetensors import SafetensorError, safe_open

    file = resolve_lora_file(path)
    if file.suffix != ".safetensors":
        raise ValueError(f"LoRA adapter {file} is not a .safetensors file; {_to_safetensors(file)}")
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 — a safetensors handle, not a dict
    except (SafetensorError, OSError) as err:
        raise ValueError(f"LoRA adapter {file} is not a readable safetensors file: {err}") from err
    layout, state = _normalise_keys(file, state)
    foreign = [k for k in state if ".lora_" not in k]
    if foreign:
        raise ValueError(f"LoRA adapter {file} holds {len(foreign)} tensor(s) that are no LoRA factors (e.g. "
                         f"{foreign[:3]}: PEFT modules_to_save or fine-tuned base weights); opd adapters are "
                         "LoRA only: train without modules_to_save, or load that checkpoint with PEFT itself")
    config, source = _file_config(file, layout, meta)
    return LoraWeights(file, layout, state, config, source)


def _normalise_keys(file: Path, state: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    """(layout, ``state`` keyed by module names) from the keys' prefix."""
    keys = list(state)
    for prefix, layout in _PREFIXES.items():
        if keys and all(k.startswith(prefix) for k in keys):
            return layout, {k.removeprefix(prefix): v for k, v in state.items()}
    known = [k for k in keys if k.startswith(tuple(_PREFIXES))]
    bare = all(".lora_" in k and not k.startswith(("text_encoder", "lora_")) for k in keys)
    if keys and not known and bare:
        return "diffusers", dict(state)  # bare module keys: a model's own save_lora_adapter
    others = sorted({k.split(".")[0] for k in keys if not k.startswith(tuple(_PREFIXES))})
    if known and any(o.startswith("text_encoder") for o in others):
        why = (f"it also adapts the text encoder(s) ({', '.join(o + '.*' for o in others)}); opd adapts the "
               "transformer only: save the transformer's part alone "
               "(save_lora_weights(transformer_lora_layers=...))")
    elif known:
        why = f"it mixes transformer LoRA keys with others ({', '.join(o + '.*' for o in others[:4])})"
    else:
        why = ("no key has the diffusers (transformer.*) or PEFT (base_model.model.*) layout; a LoRA in "
               "another layout (e.g. kohya) converts by loading it with StableDiffusion3Pipeline."
               "load_lora_weights and saving it with save_lora_weights")
    raise ValueError(f"LoRA adapter {file} holds no transformer LoRA weights opd can load (keys "
                     f"{keys[:2]}…): {why}")


def _file_config(file: Path, layout: str, meta: Mapping[str, str]) -> tuple[dict[str, Any] | None, str]:
    """(the adapter's checked LoraConfig fields, where they came from): the PEFT layout's from the
    adapter_config.json beside the file, the diffusers layout's from the file's metadata."""
    config_file = file.parent / PEFT_CONFIG_NAME
    if layout == "peft" and config_file.is_file():
        source = str(config_file)
        try:
            raw = json.loads(config_file.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{source} (the config of LoRA adapter {file}) is not readable JSON: "
                             f"{err}") from err
        if not isinstance(raw, dict):
            raise ValueError(f"{source} (the config of LoRA adapter {file}) is not a JSON object")
    elif meta.get("lora_adapter_metadata"):
        source = f"{file} (its lora_adapter_metadata)"
        try:
            raw = json.loads(meta["lora_adapter_metadata"])
        except ValueError as err:
            raise ValueError(f"{source} is not readable JSON: {err}") from err
        if any(k.startswith("transformer.") for k in raw):  # a pipeline's save_lora_weights prefixes them
            raw = {k.removeprefix("transformer."): v for k, v in raw.items() if k.startswith("transformer.")}
    elif layout == "peft":
        raise ValueError(f"LoRA adapter {file} holds PEFT-format weights (base_model.model.* keys) but no "
                         f"{PEFT_CONFIG_NAME} lies beside it, and only that file says the adapter's r and "
                         f"lora_alpha (its scale alpha/r): copy the {PEFT_CONFIG_NAME} that save_pretrained "
                         f"wrote with it into {file.parent}")
    else:
        return None, f"{file} (no LoRA config in it: diffusers infers the ranks and takes alpha = r)"
    return _lora_fields(raw, source), source


def _lora_fields(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Checked ``LoraConfig`` fields of a saved config (errors name ``source`` and the fix)."""
    import dataclasses

    from peft import LoraConfig

    def positive(value: Any) -> bool:
        return (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
                and value > 0)

    peft_type = str(raw.get("peft_type") or "LORA")
    if peft_type.upper() != "LORA":
        raise ValueError(f"{source}: peft_type is {peft_type!r}; opd loads LoRA adapters only")
    for key, meaning in (("r", "the rank"), ("lora_alpha", "alpha (the scale is lora_alpha / r)")):
        if not positive(raw.get(key)):
            raise ValueError(f"{source}: {key}={raw.get(key)!r} is not a positive number ({meaning}); set "
                             "it to the value the adapter was trained with (Flow-GRPO and DiffusionNFT: "
                             "r=32, lora_alpha=64)")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = raw.get(key) or {}
        if not isinstance(pattern, dict) or not all(positive(v) for v in pattern.values()):
            raise ValueError(f"{source}: {key}={pattern!r} must map module names to positive numbers")
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(k for k, v in raw.items() if k not in fields and v not in (None, False, {}, [], ""))
    if unknown:
        raise ValueError(f"{source}: fields {unknown} are unknown to the installed peft; upgrade peft (the "
                         f"adapter was saved by peft {raw.get('peft_version', '?')})")
    unsupported = [k for k in ("modules_to_save", "target_parameters", "layer_replication") if raw.get(k)]
    if unsupported:
        raise ValueError(f"{source}: {', '.join(f'{k}={raw[k]!r}' for k in unsupported)} change more than "
                         "LoRA factors; opd adapters are plain LoRA: load that checkpoint with PEFT itself")
    return {k: v for k, v in raw.items() if k in fields and k not in _BOOKKEEPING}


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


def convert_lora(path: str | Path, directory: str | Path) -> Path:
    """Write the adapter at ``path`` (any layout :func:`load_lora` reads) as a diffusers LoRA file in
    ``directory``, as :func:`save_lora` would; returns the file. E.g. a Flow-GRPO / DiffusionNFT
    checkpoint for ``StableDiffusion3Pipeline.load_lora_weights``, which loads nothing from a PEFT
    folder."""
    from diffusers import StableDiffusion3Pipeline

    weights = read_lora(path)
    if weights.config is None:
        raise ValueError(f"LoRA adapter {weights.file} carries no LoRA config; it is a diffusers file "
                         "already")
    metadata = dict(weights.config)
    if isinstance(metadata.get("target_modules"), list):
        metadata["target_modules"] = sorted(metadata["target_modules"])
    directory = Path(directory)
    StableDiffusion3Pipeline.save_lora_weights(str(directory), transformer_lora_layers=weights.state,
                                               transformer_lora_adapter_metadata=metadata)
    return directory / WEIGHT_NAME


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
