"""LoRA adapter files: find, read and convert them, whatever layout they were saved in.

Two layouts, told apart by the keys of the safetensors file:

* diffusers: ``transformer.<module>.lora_A.weight`` (ours, ``save_lora_weights``), or bare
  ``<module>.lora_A.weight`` (a model's ``save_lora_adapter``); r and alpha from the file's
  ``lora_adapter_metadata`` (none: diffusers infers the ranks and takes alpha = r);
* PEFT: ``base_model.model.<module>.lora_A.weight`` in ``adapter_model.safetensors`` with r, alpha,
  ``rank_pattern``, ``alpha_pattern`` and ``target_modules`` from the ``adapter_config.json`` beside it:
  what ``PeftModel.save_pretrained`` writes, i.e. Flow-GRPO's and DiffusionNFT's
  ``checkpoints/checkpoint-N/lora`` folders.

An adapter path is either such a folder or the ``.safetensors`` file itself. Putting an adapter on a
transformer is :mod:`opd.models.lora`.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: what PEFT's ``save_pretrained`` writes (Flow-GRPO, DiffusionNFT)
PEFT_WEIGHT_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
_PREFIXES = {"transformer.": "diffusers", "base_model.model.": "peft"}
_PICKLED = ("pytorch_lora_weights.bin", "adapter_model.bin")
#: adapter_config.json fields that describe the run, not the adapter
_BOOKKEEPING = {"peft_type", "peft_version", "auto_mapping", "base_model_name_or_path", "revision",
                "task_type", "inference_mode", "init_lora_weights"}



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
