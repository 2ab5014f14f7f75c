"""Mini model persistence, clear loading errors, the shipped base, SD3 loading errors."""
import json

import pytest
import torch

from conftest import ROOT
from opd.models import mini as mini_module
from opd.models.build import mini_backbone
from opd.models.mini import ByteTextEncoder, MiniBackbone
from opd.sampling import generate

TOY = {'transformer': {'sample_size': 16, 'patch_size': 4, 'in_channels': 3, 'out_channels': 3, 'num_layers': 2,
                            'attention_head_dim': 16, 'num_attention_heads': 2, 'joint_attention_dim': 32,
                            'caption_projection_dim': 32, 'pooled_projection_dim': 32, 'pos_embed_max_size': 4},
           'text_encoder': {'dim': 32, 'num_layers': 1, 'num_heads': 2, 'max_length': 40, 'pooled_dim': 32}, 'image_size': 16}


def toy(seed=0):
    torch.manual_seed(seed)
    return MiniBackbone(**TOY).eval()


def toy_base_and_adapter(root, seed: int):
    """Save a toy base (``root/base``) and a LoRA on it with random B (``root/lora``): an adapter that
    visibly changes the model, for evaluation tests."""
    from opd.models.lora import add_lora, lora_parameters, save_lora

    model = toy(seed=seed)
    model.save_pretrained(root / "base", dtype=torch.float32)
    add_lora(model.transformer, "adapter", rank=2, alpha=4)
    with torch.no_grad():
        for p in lora_parameters(model.transformer, "adapter"):
            p.add_(0.5 * torch.randn_like(p))
    save_lora(model.transformer, "adapter", root / "lora")
    return root


def test_byte_tokenizer_reads_bytes_and_cuts():
    enc = ByteTextEncoder(dim=32, num_layers=1, num_heads=2, max_length=5, pooled_dim=8)
    ids = enc.tokenize(['"CAT"', ""])
    assert ids[0].tolist() == [1, 34 + 2, 67 + 2, 65 + 2, 84 + 2, 34 + 2]
    assert ids[1].tolist() == [1, 0, 0, 0, 0, 0]
    assert enc.tokenize(["ABCDEFGH"]).shape == (1, 6)


def test_save_load_round_trip_in_several_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(mini_module, "MAX_SHARD_BYTES", 64 * 1024)
    model = toy()
    model.save_pretrained(tmp_path, dtype=torch.float32)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and all(s.stat().st_size < 200 * 1024 for s in shards)
    loaded = MiniBackbone.from_pretrained(tmp_path)
    x = torch.randn(2, 3, 16, 16)
    cond = model.encode_prompts(["a red circle", 'a sign that says "K7P"'])
    with torch.no_grad():
        torch.testing.assert_close(loaded.velocity(x, torch.tensor([0.3, 0.8]), loaded.encode_prompts(
            ["a red circle", 'a sign that says "K7P"'])), model.velocity(x, torch.tensor([0.3, 0.8]), cond))


def test_missing_folder_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        MiniBackbone.from_pretrained(tmp_path / "nope")


def test_corrupt_weights_name_the_file(tmp_path):
    toy().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        MiniBackbone.from_pretrained(tmp_path)


def test_weights_of_another_architecture_are_refused(tmp_path):
    toy().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["transformer"]["num_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not match"):
        MiniBackbone.from_pretrained(tmp_path)


def test_shipped_base_loads_and_samples():
    model = mini_backbone(str(ROOT / "models" / "mini_base"))
    n_params = sum(p.numel() for p in model.parameters())
    assert 13.0e6 < n_params < 13.5e6
    images = generate(model, ['a sign that says "CAT"'], num_steps=2, guidance_scale=4.5)
    assert images.shape == (1, 3, 64, 64) and 0.0 <= images.min() and images.max() <= 1.0


def test_image_size_mismatch_is_named(tmp_path):
    toy().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model.image_size=64"):
        mini_backbone(str(tmp_path), image_size=64)


def test_generate_does_not_depend_on_batch_size():
    model = toy()
    prompts = ["a red circle", "a blue square", "a photo of two triangles"]
    a = generate(model, prompts, num_steps=3, guidance_scale=2.0, batch_size=3)
    b = generate(model, prompts, num_steps=3, guidance_scale=2.0, batch_size=1)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_sd3_missing_weights_error_says_how_to_fix(tmp_path):
    from opd.models.sd3 import SD3Backbone

    (tmp_path / "sd35").mkdir()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        SD3Backbone.from_pretrained(str(tmp_path / "sd35"))


def test_loaded_lora_acts_exactly_like_the_trained_one(tmp_path):
    """alpha ≠ rank: a reload must keep the scale alpha/r (diffusers falls back to alpha = r when it
    is handed the file instead of the folder)."""
    from opd.models.lora import active_adapter, add_lora, load_lora, lora_parameters, save_lora

    trained = toy()
    add_lora(trained.transformer, "t", rank=2, alpha=8)
    torch.manual_seed(1)
    for p in lora_parameters(trained.transformer, "t"):
        p.data.normal_(0, 0.3)
    save_lora(trained.transformer, "t", tmp_path / "lora")
    fresh = toy()
    load_lora(fresh.transformer, tmp_path / "lora", "loaded")
    assert fresh.transformer.peft_config["loaded"].lora_alpha == 8
    x = torch.randn(2, 3, 16, 16)
    cond = trained.encode_prompts(["a red circle", "a sign"])
    with torch.no_grad(), active_adapter(trained.transformer, "t"), active_adapter(fresh.transformer, "loaded"):
        a = trained.velocity(x, torch.tensor([0.7, 0.3]), cond)
        b = fresh.velocity(x, torch.tensor([0.7, 0.3]), cond)
        base = toy().velocity(x, torch.tensor([0.7, 0.3]), cond)
    assert (a - base).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_compiled_mini_blocks_give_the_same_lora_gradients(tmp_path):
    """model.compile_blocks (mini): each block compiled at construction; the LoRA added afterwards runs
    compiled (tracing is lazy) with eager's velocities and gradients. Off by default."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from opd.models.lora import add_lora, lora_parameters, set_trainable

    toy(seed=3).save_pretrained(tmp_path, dtype=torch.float32)

    def grads(**options):
        model = mini_backbone(str(tmp_path), image_size=16, **options)
        torch.manual_seed(1)
        add_lora(model.transformer, "student", rank=2, alpha=4)
        with torch.no_grad():
            for p in lora_parameters(model.transformer, "student"):
                p.add_(0.1 * torch.randn_like(p))
        set_trainable(model.transformer, "student")
        x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
        v = model.velocity(x, torch.tensor([0.3, 0.8]), model.encode_prompts(["a red circle", "a blue square"]))
        v.square().mean().backward()
        return v.detach(), {n: p.grad.clone() for n, p in model.transformer.named_parameters() if ".student." in n}

    v_eager, g_eager = grads()
    counter = CompileCounterWithBackend("aot_eager")
    try:
        v_compiled, g_compiled = grads(compile_blocks=True, compile_backend=counter)
        assert counter.frame_count >= 1  # the blocks did run compiled
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(v_compiled, v_eager, rtol=1e-5, atol=1e-6)
    assert g_eager.keys() == g_compiled.keys() and any(g.abs().sum() > 0 for g in g_eager.values())
    for name in g_eager:
        torch.testing.assert_close(g_compiled[name], g_eager[name], rtol=1e-5, atol=1e-7, msg=name)
    assert not any(b._compiled_call_impl is not None for b in mini_backbone(str(tmp_path), image_size=16)
                   .transformer.transformer_blocks)
