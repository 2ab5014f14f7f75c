"""Factories named by ``conf/model/*.yaml`` (``_partial_: true``: built in ``configure_model``)."""
from __future__ import annotations

from opd.models.mini import MiniBackbone
from opd.models.sd3 import SD3Backbone, resolve_dtype


def mini_backbone(path: str | None = None, image_size: int = 64, torch_dtype: str = "float32",
                  transformer: dict | None = None, text_encoder: dict | None = None, compile_blocks: bool = False,
                  compile_backend: str = "inductor", compile_mode: str | None = None) -> MiniBackbone:
    """The mini-world model: loaded from ``path`` or, with ``path=None``, randomly initialised
    (``transformer``/``text_encoder`` override the architecture, e.g. a toy size in tests).
    ``compile_blocks``: ``torch.compile`` each transformer block (:func:`opd.models.speed.compile_blocks`,
    with ``compile_backend`` and ``compile_mode``): the same math in fewer, fused kernels."""
    if path is None:
        model = MiniBackbone(transformer=transformer, text_encoder=text_encoder, image_size=image_size)
        model = model.to(resolve_dtype(torch_dtype))
    else:
        model = MiniBackbone.from_pretrained(path, torch_dtype=torch_dtype)
        if model.image_size != image_size:
            raise ValueError(f"model.image_size={image_size} but {path} was trained at {model.image_size} px")
    if compile_blocks:
        from opd.models.speed import compile_blocks as compile_each_block

        compile_each_block(model.transformer, backend=compile_backend, mode=compile_mode)
    return model


def sd3_backbone(path: str, use_t5: bool = True, torch_dtype: str = "bfloat16", max_sequence_length: int = 128,
                 image_size: int = 512, gradient_checkpointing: bool = False, compile_blocks: bool = False,
                 compile_backend: str = "inductor") -> SD3Backbone:
    """SD3.5 from a local diffusers folder or hub id; ``image_size`` is the training/eval resolution.
    T5 on at 128 tokens (the references' prompt encoding; ``use_t5=False`` saves its memory);
    ``gradient_checkpointing``: recompute the MMDiT blocks in the backward pass; ``compile_blocks``:
    ``torch.compile`` each block (see :class:`SD3Backbone`)."""
    backbone = SD3Backbone.from_pretrained(path, use_t5=use_t5, torch_dtype=torch_dtype,
                                           max_sequence_length=max_sequence_length,
                                           gradient_checkpointing=gradient_checkpointing,
                                           compile_blocks=compile_blocks, compile_backend=compile_backend)
    backbone.image_size = image_size
    return backbone
