"""LoRA adapters on the backbone's transformer (peft through diffusers' adapter mixin).

One backbone carries the trainable student adapter and any number of frozen teacher adapters;
disabling all adapters gives the reference model. Saved adapters are diffusers LoRA files
(``pytorch_lora_weights.safetensors`` with ``transformer.``-prefixed keys and the LoRA config in
the metadata), so ``StableDiffusion3Pipeline.load_lora_weights`` reads them.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from torch import nn

#: the references' targets: every attention projection of both MMDiT streams
DEFAULT_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                   "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def add_lora(transformer: nn.Module, name: str, rank: int = 32, alpha: float = 64,
             target_modules: Sequence[str] = DEFAULT_TARGETS, init: str | bool = "gaussian") -> None:
    """Add a trainable adapter ``name``; ``init="gaussian"`` draws A and zeroes B, so the adapted
    model starts equal to the base."""
    from peft import LoraConfig

    if name in adapter_names(transformer):
        raise ValueError(f"adapter {name!r} already exists on the transformer")
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init, target_modules=list(target_modules))
    transformer.add_adapter(config, adapter_name=name)
    transformer.set_adapter(name)


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
    """A LoRA folder or file → the safetensors file; errors name the path."""
    path = Path(path)
    file = path / WEIGHT_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"LoRA adapter not found: {file} (expected a folder holding {WEIGHT_NAME} "
                                "or the file itself)")
    return file


def load_lora(transformer: nn.Module, path: str | Path, name: str) -> None:
    """Load a diffusers LoRA file as a frozen adapter ``name``.

    Fails clearly on an unreadable file or on an adapter made for another architecture (keys or
    shapes that do not fit this transformer).
    """
    from safetensors import SafetensorError, safe_open

    file = resolve_lora_file(path)
    try:
        with safe_open(str(file), framework="pt") as f:
            keys = list(f.keys())
            meta = (f.metadata() or {}).get("lora_adapter_metadata")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"LoRA adapter {file} is not a readable safetensors file: {err}") from err
    if not keys or not all(k.startswith("transformer.") for k in keys):
        raise ValueError(f"LoRA adapter {file} holds no transformer LoRA weights (keys {keys[:2]}…)")
    previous = list(transformer.active_adapters()) if adapter_names(transformer) else []
    try:
        # a folder + weight_name makes diffusers read the LoRA config (alpha!) from the file's metadata;
        # given the file path itself it silently falls back to alpha = rank
        transformer.load_lora_adapter(str(file.parent), weight_name=file.name, use_safetensors=True,
                                      prefix="transformer", adapter_name=name)
    except (RuntimeError, ValueError, KeyError) as err:
        raise ValueError(f"LoRA adapter {file} does not fit this model (made for another base model?): {err}") \
            from err
    if previous:
        transformer.set_adapter(previous if len(previous) > 1 else previous[0])
    _check_alpha(transformer, file, name, meta)
    for n, p in transformer.named_parameters():
        if f".{name}." in n:
            p.requires_grad_(False)


def _check_alpha(transformer: nn.Module, file: Path, name: str, meta: str | None) -> None:
    """The loaded adapter's scale must be the saved one (``lora_alpha / r`` from the file's
    ``lora_adapter_metadata``, read when the file was first opened)."""
    import json

    if meta is None:
        return  # a LoRA file from elsewhere without metadata: diffusers' inference is all there is
    saved = json.loads(meta)
    loaded = transformer.peft_config[name]
    if (saved.get("transformer.r"), saved.get("transformer.lora_alpha")) != (loaded.r, loaded.lora_alpha):
        raise RuntimeError(f"LoRA adapter {file} was saved with r={saved.get('transformer.r')}, "
                           f"alpha={saved.get('transformer.lora_alpha')} but loaded as r={loaded.r}, "
                           f"alpha={loaded.lora_alpha}")


def copy_lora(transformer: nn.Module, path: str | Path, name: str) -> None:
    """Start adapter ``name`` from the LoRA file at ``path`` (e.g. the next stage of cascade RL).

    The file is loaded as a temporary adapter and its weights are copied into ``name``, which must
    have the same targets, rank and alpha; anything else fails with a message saying which.
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
            p.data.copy_(source[n].data)
    finally:
        transformer.delete_adapters(scratch)
        transformer.set_adapter(name)
