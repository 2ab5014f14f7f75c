"""model=sd35_medium_random: SD3.5-Medium's real sizes (checked on the meta device: shapes and parameter
counts, nothing allocated) and, shrunk by overrides through the same factory, built and run on the CPU;
random teacher adapters for it (python -m opd.models.random_adapters) and a toy-sized dry run of the
MOPD experiment with them; model=sd35_medium's T5 defaults; gradient checkpointing."""
from __future__ import annotations

import json

import hydra
import torch
from omegaconf import OmegaConf

from conftest import ROOT
from opd.models.lora import add_lora, load_lora, lora_parameters, read_lora, set_trainable
from opd.models.random_adapters import main as random_adapters
from opd.models.random_adapters import meta_transformer
from opd.models.random_sd3 import CLIP_MAX_LENGTH, parameter_counts, tiny_sd3_backbone

#: widths and depths cut down to seconds on a CPU; every other value (T5 on, 128 T5 tokens, 16 latent
#: channels, patch 2, RMS qk-norm, dual attention in the first layers, the VAE's 8x downsampling and
#: factors, the real vocabularies) stays the full config's
SHRINK = {
    "transformer": {"num_layers": 3, "num_attention_heads": 2, "attention_head_dim": 16, "caption_projection_dim": 32,
                    "joint_attention_dim": 48, "pooled_projection_dim": 40, "pos_embed_max_size": 8, "sample_size": 8,
                    "dual_attention_layers": [0, 1]},
    "clip_l": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
               "projection_dim": 16},
    "clip_g": {"hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
               "projection_dim": 24},
    "t5": {"d_model": 48, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 2},
    "vae": {"block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 64},
}
# (the blocks are compiled as at full size, with aot_eager: the wiring without inductor's C++ build)
SMALL_MODEL = ["model=sd35_medium_random", "model.image_size=64", "model.torch_dtype=float32",
               "model.compile_backend=aot_eager",
               *(f"model.{part}.{key}={json.dumps(value).replace(' ', '')}"
                 for part, values in SHRINK.items() for key, value in values.items())]


def model_cfg(cfg_factory, overrides=()) -> dict:
    cfg = cfg_factory("train", ["model=sd35_medium_random", *overrides])
    return OmegaConf.to_container(cfg.model, resolve=True)


def build(cfg_factory, overrides=()):
    cfg = cfg_factory("train", [*SMALL_MODEL, *overrides])
    return hydra.utils.instantiate(cfg.model)()


def test_full_size_is_sd35_medium(cfg_factory):
    """The full config's networks, built on the meta device: SD3.5-Medium's layer shapes and counts."""
    from opd.models.random_sd3 import build_components

    model = model_cfg(cfg_factory)
    assert (model["use_t5"], model["max_sequence_length"], model["torch_dtype"]) == (True, 128, "bfloat16")
    tr, clip_l, clip_g, t5, vae = (model[k] for k in ("transformer", "clip_l", "clip_g", "t5", "vae"))
    # the sizes fit together as the pipeline joins them
    hidden = tr["num_attention_heads"] * tr["attention_head_dim"]
    assert hidden == tr["caption_projection_dim"] == 1536
    assert tr["joint_attention_dim"] == t5["d_model"] == 4096 >= clip_l["hidden_size"] + clip_g["hidden_size"]
    assert tr["pooled_projection_dim"] == clip_l["projection_dim"] + clip_g["projection_dim"] == 2048
    assert tr["in_channels"] == tr["out_channels"] == vae["latent_channels"] == 16
    with torch.device("meta"):
        parts = build_components(tr, vae, clip_l, clip_g, t5)
    net = parts["transformer"]
    assert next(net.parameters()).is_meta
    # diffusers' single-file loader recognises SD3.5 Medium by these two tensors
    assert net.pos_embed.pos_embed.shape == (1, 147456, 1536)  # 384² positions
    assert net.transformer_blocks[0].norm1_context.linear.bias.shape == (9216,)  # 6 × 1536
    assert len(net.transformer_blocks) == 24
    assert [i for i, b in enumerate(net.transformer_blocks) if b.attn2 is not None] == list(range(13))
    assert [i for i, b in enumerate(net.transformer_blocks) if b.context_pre_only] == [23]
    assert type(net.transformer_blocks[0].attn.norm_q).__name__ == "RMSNorm"
    assert net.pos_embed.proj.weight.shape == (1536, 16, 2, 2)
    assert net.context_embedder.weight.shape == (1536, 4096)
    assert net.proj_out.weight.shape == (2 * 2 * 16, 1536)
    assert parts["clip_l"].text_projection.weight.shape == (768, 768)
    assert len(parts["clip_l"].text_model.encoder.layers) == 12
    assert parts["clip_g"].text_projection.weight.shape == (1280, 1280)
    assert len(parts["clip_g"].text_model.encoder.layers) == 32
    t5_net = parts["t5"]
    assert t5_net.shared.weight.shape == (32128, 4096) and len(t5_net.encoder.block) == 24
    ff = t5_net.encoder.block[0].layer[1].DenseReluDense
    assert (ff.wi_0.weight.shape, ff.wo.weight.shape) == ((10240, 4096), (4096, 10240))  # gated GELU
    assert t5_net.encoder.block[0].layer[0].SelfAttention.q.weight.shape == (64 * 64, 4096)
    assert parts["vae"].encoder.conv_out.out_channels == 2 * 16 and parts["vae"].decoder.conv_in.in_channels == 16
    assert (parts["vae"].config.scaling_factor, parts["vae"].config.shift_factor) == (1.5305, 0.0609)


def test_full_size_parameter_counts(cfg_factory):
    """Counted from the configs on the meta device: the MMDiT-X's 2.24 B parameters plus its 0.23 B stored
    positional table are the "2.5 B" of SD3.5 Medium; T5-XXL's encoder is 4.76 B."""
    counts = parameter_counts(**model_cfg(cfg_factory))
    mmdit = counts["transformer"]
    assert mmdit["parameters"] == 2_243_171_520
    assert mmdit["buffers"] == 384 * 384 * 1536  # the positional table, saved with the weights
    assert 2.4e9 < mmdit["parameters"] + mmdit["buffers"] < 2.6e9
    assert counts["t5"]["parameters"] == 4_762_310_656
    assert counts["clip_l"]["parameters"] == 123_650_304
    assert counts["clip_g"]["parameters"] == 694_659_840
    assert counts["vae"]["parameters"] == 83_819_683
    # use_t5=false leaves T5 out (the memory option)
    assert "t5" not in parameter_counts(**{**model_cfg(cfg_factory), "t5": None})


def test_shrunk_variant_builds_runs_and_has_the_configured_shapes(cfg_factory):
    backbone = build(cfg_factory)
    cfg = model_cfg(cfg_factory, SMALL_MODEL[1:])
    tr, t5 = cfg["transformer"], cfg["t5"]
    net = backbone.transformer
    for key, value in tr.items():  # the built network is the configured one
        assert list(net.config[key]) == value if isinstance(value, list) else net.config[key] == value, key
    assert [i for i, b in enumerate(net.transformer_blocks) if b.attn2 is not None] == [0, 1]
    assert len(backbone.text_encoders) == 3  # CLIP-L, CLIP-G, T5
    assert backbone.text_encoders[2].config.d_model == t5["d_model"] == tr["joint_attention_dim"]
    assert backbone.max_sequence_length == 128 and backbone.image_size == 64
    assert backbone.dtype == torch.float32 and not backbone.gradient_checkpointing

    prompts = ['a sign that says "OPD"', "a photo of a cat"]
    cond = backbone.encode_prompts(prompts)
    assert cond.embeds.shape == (2, CLIP_MAX_LENGTH + 128, 48)  # CLIP tokens, then T5's 128
    assert cond.pooled.shape == (2, 40)
    t5_part = cond.embeds[:, CLIP_MAX_LENGTH:]
    assert t5_part.abs().sum() > 0 and (t5_part[0] - t5_part[1]).abs().max() > 0  # T5 encodes the prompts
    c, h, w = backbone.latent_shape(64, 64)
    assert (c, h, w) == (16, 8, 8)
    x = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(0))
    v = backbone.velocity(x, torch.tensor([0.5, 0.9]), cond)
    assert v.shape == x.shape and torch.isfinite(v).all()
    images = backbone.decode(x)
    assert images.shape == (2, 3, 64, 64)
    assert backbone.encode_images(images).shape == (2, 16, 8, 8)
    backbone.train()  # Lightning does this at fit start: the frozen encoders stay in eval mode (T5 dropout off)
    assert net.training and not any(m.training for m in backbone.text_encoders.modules())
    assert not backbone.vae.training
    torch.testing.assert_close(backbone.encode_prompts(prompts).embeds, cond.embeds)


def test_shrunk_variant_in_bfloat16_and_without_t5(cfg_factory):
    backbone = build(cfg_factory, ["model.torch_dtype=bfloat16", "model.use_t5=false"])
    assert {p.dtype for p in backbone.parameters()} == {torch.bfloat16}
    assert {b.dtype for b in backbone.transformer.buffers() if b.is_floating_point()} == {torch.bfloat16}
    assert len(backbone.text_encoders) == 2 and backbone.pipeline.tokenizer_3 is None
    cond = backbone.encode_prompts(["a cat"])
    assert cond.embeds.shape == (1, CLIP_MAX_LENGTH + 128, 48)  # T5's place: zeros
    assert cond.embeds[:, CLIP_MAX_LENGTH:].abs().sum() == 0
    assert torch.get_default_dtype() == torch.float32  # restored after building


def test_sd35_medium_loads_t5_at_128_tokens_by_default(cfg_factory, tmp_path, monkeypatch):
    """model=sd35_medium: T5 on with the references' 128 tokens, use_t5=false leaves it out, and
    gradient_checkpointing reaches the transformer (the loading itself is stubbed: no weights here)."""
    from diffusers import StableDiffusion3Pipeline

    (tmp_path / "model_index.json").write_text("{}")
    calls = []

    def fake(path, **kwargs):
        calls.append(kwargs)
        return tiny_sd3_backbone().pipeline

    monkeypatch.setattr(StableDiffusion3Pipeline, "from_pretrained", staticmethod(fake))
    cfg = cfg_factory("train", ["model=sd35_medium", f"model.path={tmp_path}"])
    assert (cfg.model.use_t5, cfg.model.max_sequence_length, cfg.model.gradient_checkpointing) == (True, 128, False)
    backbone = hydra.utils.instantiate(cfg.model)()
    assert "text_encoder_3" not in calls[-1] and backbone.max_sequence_length == 128
    assert not backbone.gradient_checkpointing
    cfg = cfg_factory("train", ["model=sd35_medium", f"model.path={tmp_path}", "model.use_t5=false",
                                "model.gradient_checkpointing=true"])
    backbone = hydra.utils.instantiate(cfg.model)()
    assert calls[-1]["text_encoder_3"] is None and calls[-1]["tokenizer_3"] is None
    assert backbone.gradient_checkpointing and backbone.transformer.gradient_checkpointing


def lora_grads(checkpointing: bool, compile_backend=None) -> tuple[dict[str, torch.Tensor], int]:
    """The student LoRA's gradients of one loss on the tiny random SD3, and how many tensors autograd
    saved (``compile_backend``: the blocks compiled with it, as ``model.compile_blocks=true`` does)."""
    backbone = tiny_sd3_backbone(seed=0, gradient_checkpointing=checkpointing,
                                 compile_blocks=compile_backend is not None, compile_backend=compile_backend or "inductor")
    torch.manual_seed(1)
    add_lora(backbone.transformer, "student", rank=4, alpha=8)
    with torch.no_grad():
        for p in lora_parameters(backbone.transformer, "student"):
            p.add_(0.1 * torch.randn_like(p))
    set_trainable(backbone.transformer, "student")
    cond = backbone.encode_prompts(["a red circle", "a blue square"])
    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(2))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
        loss = backbone.velocity(x, torch.tensor([0.3, 0.8]), cond).square().mean()
    loss.backward()
    params = dict(backbone.transformer.named_parameters())
    return {n: params[n].grad.clone() for n in params if ".student." in n}, len(saved)


def test_gradient_checkpointing_gives_the_same_lora_gradients(cfg_factory):
    plain, saved_plain = lora_grads(False)
    ckpt, saved_ckpt = lora_grads(True)
    assert plain.keys() == ckpt.keys() and len(plain) > 0
    assert any(g.abs().sum() > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-6, atol=1e-9, msg=name)
    assert saved_ckpt < saved_plain / 2  # the blocks' activations are recomputed, not kept
    cfg = cfg_factory("train", ["model=sd3_tiny_random", "model.gradient_checkpointing=true"])
    assert hydra.utils.instantiate(cfg.model)().transformer.gradient_checkpointing


def test_compiled_blocks_option_gives_the_same_lora_gradients(cfg_factory, tmp_path, monkeypatch):
    """model.compile_blocks (on by default for SD3.5): each MMDiT block is compiled at construction,
    and tracing is lazy, so the LoRA added afterwards runs compiled with the same gradients."""
    from diffusers import StableDiffusion3Pipeline

    plain, _ = lora_grads(False)
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    try:
        compiled, _ = lora_grads(False, compile_backend=counter)
        assert counter.frame_count >= 1  # the blocks did run compiled
        assert plain.keys() == compiled.keys() and len(plain) > 0
        for name in plain:
            torch.testing.assert_close(compiled[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
    finally:
        torch._dynamo.reset()
    (tmp_path / "model_index.json").write_text("{}")
    monkeypatch.setattr(StableDiffusion3Pipeline, "from_pretrained",
                        staticmethod(lambda path, **kwargs: tiny_sd3_backbone().pipeline))
    for overrides, expected in (([], True), (["model.compile_blocks=false"], False)):
        cfg = cfg_factory("train", ["model=sd35_medium", f"model.path={tmp_path}", *overrides])
        blocks = hydra.utils.instantiate(cfg.model)().transformer.transformer_blocks
        assert all((b._compiled_call_impl is not None) == expected for b in blocks)
    assert not any(b._compiled_call_impl is not None for b in tiny_sd3_backbone().transformer.transformer_blocks)


def test_random_adapters_fit_the_model_and_differ(tmp_path):
    """Full size (meta device): the references' targets at r32; tiny: they load, and move the output."""
    full = random_adapters(["model=sd35_medium_random", "--out", str(tmp_path / "full"), "--names", "t"])
    weights = read_lora(full["t"])
    modules = weights.modules()
    assert len(modules) == 23 * 8 + 7  # every attention projection of both streams; the last block has no to_add_out
    assert modules["transformer_blocks.0.attn.to_q"] == ((32, 1536), (1536, 32))
    assert modules["transformer_blocks.0.attn.add_k_proj"] == ((32, 1536), (1536, 32))
    assert not any("attn2" in m for m in modules)  # the references adapt attn, not MMDiT-X's second attention
    assert (weights.config["r"], weights.config["lora_alpha"]) == (32, 64)

    written = random_adapters(["model=sd3_tiny_random", "--out", str(tmp_path / "tiny"), "--names", "a", "b",
                               "--rank", "2", "--alpha", "4", "--std", "0.3"])
    backbone = tiny_sd3_backbone()
    cond = backbone.encode_prompts(["a cat"])
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    base = backbone.velocity(x, torch.tensor([0.5]), cond)
    out = []
    for name, file in written.items():
        load_lora(backbone.transformer, file, name)
        backbone.transformer.set_adapter(name)
        out.append(backbone.velocity(x, torch.tensor([0.5]), cond))
    assert (out[0] - base).abs().max() > 1e-4 and (out[0] - out[1]).abs().max() > 1e-4
    assert meta_transformer({"_target_": "opd.models.random_sd3.random_sd3_backbone",
                             "transformer": SHRINK["transformer"]}).config.num_layers == 3


def test_dry_run_of_the_mopd_experiment_on_the_shrunk_model(cfg_factory, tmp_path, monkeypatch):
    """The GPU dry run's commands (docs/scale/README.md) at toy size: random teachers written where the
    experiment's teacher configs look, then one round of experiment=mopd_aesthetic_ocr_geneval."""
    from opd.train import train

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a sign that says "OPD"\na photo of a cat\n')
    geneval = ROOT / "data/geneval/evaluation_metadata.jsonl"
    common = ["experiment=mopd_aesthetic_ocr_geneval", *SMALL_MODEL, f"paths.weights_dir={tmp_path / 'w'}"]
    written = random_adapters([*common, "--rank", "4", "--alpha", "8"])
    assert sorted(written) == ["aesthetic", "geneval", "ocr"]
    assert all(f == tmp_path / "w" / "teachers" / n / "pytorch_lora_weights.safetensors" for n, f in written.items())
    cfg = cfg_factory("train", [
        *common, "trainer=cpu", "logger=csv", "trainer.enable_progress_bar=false", "trainer.max_steps=2",
        "trainer.log_every_n_steps=1", "callbacks.image_grid=null", "sampler.num_steps=2",
        "module.prompts_per_teacher=1", "module.train_chunk=4", "module.target_chunk=4", "module.lora={rank:2,alpha:4}",
        f"teacher.aesthetic.prompts.path={prompts}", f"teacher.ocr.prompts.path={prompts}",
        f"teacher.geneval.prompts.path={geneval}", "teacher.ocr.monitor_reward=null"])
    OmegaConf.resolve(cfg)
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 2
    assert all(torch.isfinite(torch.as_tensor(metrics[f"teacher/{t}/kl"])) for t in written)
    assert objects["module"].backbone.max_sequence_length == 128
    # the blocks ran compiled (model.compile_blocks, SD3.5's default; aot_eager here, inductor on a GPU)
    assert all(b._compiled_call_impl is not None for b in objects["module"].backbone.transformer.transformer_blocks)
