"""Ship a trained LoRA as a small fp16 copy, and say how far the copy's velocity is from the original's.

    python -m opd.results.ship_adapter runs/table1/mopd_r64_p2/adapter models/mini_students/mopd [--base models/mini_base]

Writes ``<dest>/pytorch_lora_weights.safetensors`` (same keys and LoRA metadata, fp16 tensors) and
prints, on a few inputs of the mini base: the largest velocity difference between the fp32 and
fp16 adapters, next to the largest difference the adapter itself makes against the base.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from opd.models.lora import WEIGHT_NAME, active_adapter, load_lora, resolve_lora_file
from opd.models.mini import MiniBackbone

PROMPTS = ("a photo of a red circle", 'a sign that says "CAT"', "a blue square on a navy background",
           "a photo of two triangles")


def to_fp16(source: Path, dest: Path) -> Path:
    """``<dest>/pytorch_lora_weights.safetensors``: every tensor of ``source`` in fp16, its metadata kept."""
    with safe_open(str(source), framework="pt") as f:
        tensors = {k: f.get_tensor(k).to(torch.float16) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        metadata = f.metadata() or {}
    dest.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dest / WEIGHT_NAME), metadata=metadata)
    return dest / WEIGHT_NAME


@torch.no_grad()
def velocity_gaps(base: Path, original: Path, copy: Path, prompts: Sequence[str] = PROMPTS, seed: int = 0
                  ) -> dict[str, float]:
    """The largest |velocity difference| on noisy inputs of ``prompts``: fp16 copy vs original
    (``fp16_vs_fp32``) and original adapter vs the base (``adapter_vs_base``)."""
    backbone = MiniBackbone.from_pretrained(str(base))
    load_lora(backbone.transformer, original, "original")
    load_lora(backbone.transformer, copy, "copy")
    g = torch.Generator().manual_seed(seed)
    cond = backbone.encode_prompts(list(prompts))
    x = torch.randn(len(prompts), *backbone.latent_shape(backbone.image_size, backbone.image_size), generator=g)
    sigma = torch.rand(len(prompts), generator=g).clamp(0.05, 0.95)
    v = {}
    for name in (None, "original", "copy"):
        with active_adapter(backbone.transformer, name):
            v[name] = backbone.velocity(x, sigma, cond)
    return {"fp16_vs_fp32": float((v["copy"] - v["original"]).abs().max()),
            "adapter_vs_base": float((v["original"] - v[None]).abs().max())}


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", type=Path, help="an adapter folder or .safetensors file")
    parser.add_argument("dest", type=Path)
    parser.add_argument("--base", type=Path, default=Path("models/mini_base"))
    args = parser.parse_args(argv)
    source = resolve_lora_file(args.adapter)
    copy = to_fp16(source, args.dest)
    gaps = velocity_gaps(args.base, source, copy)
    print(f"{copy}: {copy.stat().st_size / 2**20:.1f} MiB (fp32 {source.stat().st_size / 2**20:.1f} MiB); "
          f"max |v_fp16 - v_fp32| = {gaps['fp16_vs_fp32']:.2e} against max |v_adapter - v_base| = "
          f"{gaps['adapter_vs_base']:.2e} on {len(PROMPTS)} inputs")
    return gaps


if __name__ == "__main__":
    main()
