"""LoRA adapters in both layouts opd loads: diffusers (ours, ``save_lora``) and PEFT's
``save_pretrained`` (what Flow-GRPO and DiffusionNFT write). Each loads with its saved scale
(alpha / r, rank and alpha patterns) and acts exactly like the model that saved it; what cannot be
loaded fails with a message naming the file and the fix; and a trained student, loaded into a plain
diffusers ``StableDiffusion3Pipeline``, samples the image our rollout samples. All on the tiny random
SD3 (no download, CPU)."""
import copy
import json
import logging
import shutil

import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

from opd.models.lora import (
    DEFAULT_TARGETS,
    PEFT_CONFIG_NAME,
    PEFT_WEIGHT_NAME,
    WEIGHT_NAME,
    active_adapter,
    adapter_names,
    add_lora,
    convert_lora,
    copy_lora,
    load_lora,
    lora_parameters,
    read_lora,
    resolve_lora_file,
    save_lora,
)
from opd.models.random_sd3 import tiny_sd3_backbone
from opd.sampling import rollout, sd3_sigmas

PROMPTS = ["a photo of a red circle", 'a sign that says "CAT"']
#: a rank and an alpha that differ per module, so that a loader ignoring the patterns (or alpha) is caught
PATTERNS = {"rank_pattern": {"transformer_blocks.1.attn.to_q": 2}, "alpha_pattern": {"attn.to_k": 3}}
#: loaded adapters must act like their source to float rounding (the same float32 ops in the same order)
TIGHT = 1e-6
#: our rollout against diffusers' pipeline, float32 on the CPU, 4 steps: the same ops in the same order
#: (measured: 0); tests/test_sd3_parity.py allows 1e-4 for the base model
IMAGE_TOL = 1e-5
PICKLED = "adapter_model.bin"


@pytest.fixture(scope="module")
def backbone():
    return tiny_sd3_backbone(seed=0)


def randomise(params, seed=1):
    """Non-zero A and B: an adapter that visibly changes the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def peft_checkpoint(transformer, folder, patterns=True, seed=1):
    """What Flow-GRPO's save_ckpt writes: ``get_peft_model(transformer, LoraConfig(...))`` trained, then
    ``save_pretrained(<run>/checkpoints/checkpoint-N/lora)``; returns the PeftModel."""
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=list(DEFAULT_TARGETS),
                        **(PATTERNS if patterns else {}))
    model = get_peft_model(copy.deepcopy(transformer), config)
    randomise([p for n, p in model.named_parameters() if "lora_" in n], seed)
    model.save_pretrained(str(folder))
    return model


@pytest.fixture(scope="module")
def peft_run(backbone, tmp_path_factory):
    """(checkpoint-3 folder, its lora folder, the PeftModel that wrote it)."""
    checkpoint = tmp_path_factory.mktemp("flow_grpo_run") / "checkpoints" / "checkpoint-3"
    model = peft_checkpoint(backbone.transformer, checkpoint / "lora")
    return checkpoint, checkpoint / "lora", model


def inputs(seed=5):
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(2, 4, 32, 32, generator=g), "timestep": torch.tensor([700.0, 250.0]),
            "encoder_hidden_states": torch.randn(2, 12, 32, generator=g),
            "pooled_projections": torch.randn(2, 64, generator=g)}


@torch.no_grad()
def forward(transformer, adapter=None):
    """The transformer's output on fixed inputs with ``adapter`` active (``None``: as it is)."""
    if adapter is None:
        return transformer(**inputs(), return_dict=False)[0]
    with active_adapter(transformer, adapter):
        return transformer(**inputs(), return_dict=False)[0]


def our_images(backbone, latents, steps=4, scale=4.5):
    """opd's rollout (ODE, CFG ``scale`` against the empty prompt, SD3 schedule with shift 3) → images."""
    cond = backbone.encode_prompts(PROMPTS)
    uncond = backbone.encode_prompts([""] * len(PROMPTS))
    with torch.no_grad():
        traj = rollout(backbone, cond, latents, sd3_sigmas(steps, 3.0), kernel="ode", guidance_scale=scale,
                       uncond=uncond)
        return backbone.decode(traj.final)


def plain_pipeline(backbone):
    """A fresh ``StableDiffusion3Pipeline`` from copies of the tiny model's components (no adapters)."""
    return StableDiffusion3Pipeline(**copy.deepcopy(backbone.pipeline.components))


def diffusers_images(pipe, steps=4, scale=4.5, **noise):
    with torch.no_grad():
        return pipe(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=scale, height=32, width=32,
                    output_type="pt", **noise).images


# -- PEFT save_pretrained (Flow-GRPO, DiffusionNFT) -------------------------------------------------
def test_peft_checkpoint_acts_exactly_like_the_peft_model_that_saved_it(backbone, peft_run):
    _, lora, model = peft_run
    theirs, base = forward(model), forward(backbone.transformer)
    assert (theirs - base).abs().max() > 1e-2  # the adapter matters
    for path in (lora, lora / PEFT_WEIGHT_NAME):  # the folder or the file
        mine = copy.deepcopy(backbone.transformer)
        load_lora(mine, path, "teacher")
        diff = (forward(mine, "teacher") - theirs).abs().max().item()
        assert diff <= TIGHT, (path, diff)
        blocks = mine.transformer_blocks
        assert blocks[0].attn.to_q.scaling["teacher"] == 8 / 4  # lora_alpha / r from adapter_config.json
        assert blocks[1].attn.to_q.r["teacher"] == 2 and blocks[1].attn.to_q.scaling["teacher"] == 8 / 2
        assert blocks[0].attn.to_k.scaling["teacher"] == 3 / 4  # alpha_pattern
        assert not any(p.requires_grad for p in lora_parameters(mine, "teacher"))


def test_layouts_are_told_by_their_keys(backbone, peft_run, tmp_path):
    lora = peft_run[1]
    assert resolve_lora_file(lora) == lora / PEFT_WEIGHT_NAME
    peft = read_lora(lora)
    assert peft.layout == "peft" and peft.source == str(lora / PEFT_CONFIG_NAME)
    assert all(k.startswith("transformer_blocks.") for k in peft.state)  # base_model.model. dropped
    mine = copy.deepcopy(backbone.transformer)
    load_lora(mine, lora, "t")
    ours = read_lora(save_lora(mine, "t", tmp_path / "ours"))
    assert ours.layout == "diffusers" and ours.modules() == peft.modules()
    for key, value in peft.state.items():
        torch.testing.assert_close(ours.state[key], value, rtol=0, atol=0)


def test_a_flow_grpo_checkpoint_folder_names_its_lora_subfolder(peft_run):
    checkpoint, lora, _ = peft_run
    message = (rf"LoRA adapter not found: {checkpoint} holds neither {WEIGHT_NAME} .* nor {PEFT_WEIGHT_NAME}"
               rf".*subfolder\(s\) {lora} hold one: point at that folder")
    with pytest.raises(FileNotFoundError, match=message):
        resolve_lora_file(checkpoint)


def test_peft_adapters_saved_under_another_name_load_from_their_subfolder(backbone, tmp_path):
    """PEFT's save_pretrained puts a non-default adapter in <folder>/<adapter name>."""
    model = peft_checkpoint(backbone.transformer, tmp_path / "run", patterns=False)
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=6, target_modules=["attn.to_q", "attn.to_v"]))
    model.save_pretrained(str(tmp_path / "run"))
    assert resolve_lora_file(tmp_path / "run" / "second").name == PEFT_WEIGHT_NAME
    mine = copy.deepcopy(backbone.transformer)
    load_lora(mine, tmp_path / "run" / "second", "s")
    assert mine.transformer_blocks[0].attn.to_v.scaling["s"] == 3.0
    assert not hasattr(mine.transformer_blocks[0].attn.to_k, "lora_A")  # targets from adapter_config.json


# -- diffusers layouts --------------------------------------------------------------------------------
@pytest.mark.parametrize("saver", ["save_lora", "save_lora_adapter"])
def test_diffusers_adapter_acts_exactly_like_the_model_that_saved_it(backbone, tmp_path, saver):
    """Ours (``transformer.``-prefixed keys, config in the metadata) and a model's own
    ``save_lora_adapter`` (bare keys), with rank and alpha patterns."""
    trained = copy.deepcopy(backbone.transformer)
    trained.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=list(DEFAULT_TARGETS), **PATTERNS), "s")
    randomise(lora_parameters(trained, "s"))
    if saver == "save_lora":
        save_lora(trained, "s", tmp_path)
    else:
        trained.save_lora_adapter(str(tmp_path), adapter_name="s")
    mine = copy.deepcopy(backbone.transformer)
    load_lora(mine, tmp_path, "loaded")
    diff = (forward(mine, "loaded") - forward(trained, "s")).abs().max().item()
    assert diff <= TIGHT, diff
    assert (forward(trained, "s") - forward(backbone.transformer)).abs().max() > 1e-2
    assert mine.transformer_blocks[0].attn.to_k.scaling["loaded"] == 3 / 4


def test_a_diffusers_file_without_config_loads_with_alpha_equal_rank_and_says_so(backbone, tmp_path, caplog):
    trained = copy.deepcopy(backbone.transformer)
    add_lora(trained, "s", rank=2, alpha=2)
    randomise(lora_parameters(trained, "s"))
    from peft.utils import get_peft_model_state_dict
    state = get_peft_model_state_dict(trained, adapter_name="s")
    StableDiffusion3Pipeline.save_lora_weights(str(tmp_path), transformer_lora_layers=state)  # no metadata
    mine = copy.deepcopy(backbone.transformer)
    with caplog.at_level(logging.WARNING, logger="opd.models.lora"):
        load_lora(mine, tmp_path, "loaded")
    assert "carries no LoRA config" in caplog.text
    assert (forward(mine, "loaded") - forward(trained, "s")).abs().max().item() <= TIGHT


# -- the trained student in a plain diffusers pipeline -----------------------------------------------
@pytest.mark.parametrize("noise", ["latents", "seed"])
def test_the_student_samples_the_same_image_in_a_plain_diffusers_pipeline(backbone, tmp_path, noise):
    """docs/adapters.md's snippet on the tiny model: save the student as a run does (<run>/adapter),
    ``load_lora_weights`` it into a plain StableDiffusion3Pipeline, sample; our rollout of the same
    student (ODE, CFG 4.5, 4 steps, shift 3) from the same noise gives the same image. ``seed``: the
    pipeline draws the noise from ``generator``; ours is ``torch.randn`` from the same seed."""
    student = copy.deepcopy(backbone)
    add_lora(student.transformer, "student", rank=4, alpha=8)  # alpha ≠ r: the scale must survive
    randomise(lora_parameters(student.transformer, "student"))
    adapter = save_lora(student.transformer, "student", tmp_path / "run" / "adapter").parent
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(4))
    with active_adapter(student.transformer, "student"):
        ours = our_images(student, latents)
    with active_adapter(student.transformer, None):
        base = our_images(student, latents)
    pipe = plain_pipeline(backbone)
    pipe.load_lora_weights(str(adapter))
    if noise == "latents":
        args = {"latents": latents.clone()}
    else:
        args = {"generator": torch.Generator().manual_seed(4)}
    theirs = diffusers_images(pipe, **args)
    assert theirs.shape == ours.shape == (2, 3, 32, 32)
    assert (ours - base).abs().max() > 1e-3  # the student differs from the base: the check is not vacuous
    diff = (ours - theirs).abs().max().item()
    assert diff < IMAGE_TOL, diff


def test_a_peft_teacher_converted_to_diffusers_samples_as_it_does_in_opd(backbone, peft_run, tmp_path):
    """``convert_lora``: a Flow-GRPO checkpoint for ``load_lora_weights`` (which reads nothing from a
    PEFT folder); the pipeline's image equals our rollout of the same teacher loaded from the folder."""
    _, lora, _ = peft_run
    teacher = copy.deepcopy(backbone)
    load_lora(teacher.transformer, lora, "teacher")
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(6))
    with active_adapter(teacher.transformer, "teacher"):
        ours = our_images(teacher, latents)
    file = convert_lora(lora, tmp_path / "converted")
    assert file == tmp_path / "converted" / WEIGHT_NAME and read_lora(file).layout == "diffusers"
    pipe = plain_pipeline(backbone)
    pipe.load_lora_weights(str(file.parent))
    diff = (ours - diffusers_images(pipe, latents=latents.clone())).abs().max().item()
    assert diff < IMAGE_TOL, diff


# -- copy_lora (init_adapter) from a PEFT checkpoint ------------------------------------------------
def test_init_adapter_from_a_peft_checkpoint(backbone, tmp_path, peft_run):
    model = peft_checkpoint(backbone.transformer, tmp_path / "plain", patterns=False, seed=3)
    mine = copy.deepcopy(backbone.transformer)
    add_lora(mine, "student", rank=4, alpha=8)
    copy_lora(mine, tmp_path / "plain", "student")
    assert adapter_names(mine) == ["student"]
    assert (forward(mine, "student") - forward(model)).abs().max().item() <= TIGHT
    with pytest.raises(ValueError, match=r"has shape \(2, 32\) at .*transformer_blocks\.1\.attn\.to_q.*a "
                                         r"rank_pattern\?\): set module\.lora to match"):
        copy_lora(mine, peft_run[1], "student")
    assert adapter_names(mine) == ["student"]


# -- what cannot be loaded ------------------------------------------------------------------------------
def test_folders_without_a_known_adapter_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"LoRA adapter not found: {tmp_path / 'nowhere'} "):
        resolve_lora_file(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    message = (rf"{tmp_path / 'empty'} holds neither {WEIGHT_NAME} \(diffusers / opd\) nor "
               rf"{PEFT_WEIGHT_NAME} \+ {PEFT_CONFIG_NAME}")
    with pytest.raises(FileNotFoundError, match=message):
        load_lora(torch.nn.Module(), tmp_path / "empty", "x")
    (tmp_path / "pickled").mkdir()
    torch.save({"base_model.model.a.lora_A.weight": torch.zeros(1, 1)}, tmp_path / "pickled" / PICKLED)
    message = (r"holds adapter_model\.bin, a pickled checkpoint, not a safetensors file; convert it once: "
               r".*adapter_model\.safetensors")
    with pytest.raises(FileNotFoundError, match=message):
        resolve_lora_file(tmp_path / "pickled")


def test_files_with_no_transformer_lora_weights(backbone, tmp_path):
    transformer = copy.deepcopy(backbone.transformer)
    cases = {
        "garbage": (None, "is not a readable safetensors file"),
        "unknown": ({"lora_unet_block_0.lora_down.weight": torch.zeros(2, 4)},
                    "holds no transformer LoRA weights opd can load .*no key has the diffusers"),
        "text_encoder": ({"transformer.a.lora_A.weight": torch.zeros(2, 4),
                          "text_encoder.b.lora_A.weight": torch.zeros(2, 4)},
                         (r"also adapts the text encoder\(s\) \(text_encoder\.\*\); opd adapts the "
                          "transformer only")),
        "full_weights": ({"base_model.model.proj_out.weight": torch.zeros(4, 4)},
                         "no LoRA factors .*modules_to_save"),
    }
    for name, (tensors, message) in cases.items():
        file = tmp_path / name / WEIGHT_NAME
        file.parent.mkdir()
        if tensors is None:
            file.write_bytes(b"not safetensors")
        else:
            save_file(tensors, str(file))
        with pytest.raises(ValueError, match=f"LoRA adapter {file} .*{message}"):
            load_lora(transformer, file.parent, "x")
    assert adapter_names(transformer) == []


def test_peft_weights_need_their_adapter_config(backbone, peft_run, tmp_path):
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(peft_run[1] / PEFT_WEIGHT_NAME, alone)
    message = (f"LoRA adapter {alone / PEFT_WEIGHT_NAME} holds PEFT-format weights .*no {PEFT_CONFIG_NAME} "
               f"lies beside it.*copy the {PEFT_CONFIG_NAME}")
    with pytest.raises(ValueError, match=message):
        load_lora(copy.deepcopy(backbone.transformer), alone, "x")


BAD_CONFIGS = {
    "rank": ({"r": 8, "rank_pattern": {}}, (r"has rank 4 at transformer_blocks\.0\.attn\.\S+ but its "
                                           r"config .*adapter_config\.json says r=8 there.*put the config")),
    "pattern": ({"rank_pattern": {}}, r"has rank 2 at transformer_blocks\.1\.attn\.to_q but .* says r=4"),
    "targets": ({"target_modules": [t for t in DEFAULT_TARGETS if t != "attn.to_v"]},
                (r"does not match its config .*adapter_config\.json: weights for 2 module\(s\) "
                 r"target_modules does not name \(e\.g\. \['transformer_blocks\.0\.attn\.to_v'")),
    "no_alpha": ({"lora_alpha": None}, (r"adapter_config\.json: lora_alpha=None is not a positive "
                                        "number.*r=32, lora_alpha=64")),
    "zero_alpha": ({"lora_alpha": 0}, "lora_alpha=0 is not a positive number"),
    "bad_pattern": ({"alpha_pattern": {"attn.to_k": "x"}}, "alpha_pattern=.* must map module names to"),
    "loha": ({"peft_type": "LOHA"}, "peft_type is 'LOHA'; opd loads LoRA adapters only"),
    "modules_to_save": ({"modules_to_save": ["proj_out"]}, r"modules_to_save=\['proj_out'\] change more"),
    "newer_peft": ({"use_quantum": True}, r"fields \['use_quantum'\] are unknown to the installed peft"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_a_config_that_does_not_describe_the_weights(backbone, peft_run, tmp_path, case):
    change, message = BAD_CONFIGS[case]
    folder = tmp_path / "lora"
    shutil.copytree(peft_run[1], folder)
    config = json.loads((folder / PEFT_CONFIG_NAME).read_text())
    (folder / PEFT_CONFIG_NAME).write_text(json.dumps({**config, **change}))
    transformer = copy.deepcopy(backbone.transformer)
    with pytest.raises(ValueError, match=message) as err:
        load_lora(transformer, folder, "x")
    assert str(folder) in str(err.value)
    assert adapter_names(transformer) == []


def test_an_adapter_for_another_base_model(backbone, tmp_path):
    kwargs = {"sample_size": 32, "patch_size": 1, "in_channels": 4, "num_layers": 2, "attention_head_dim": 8,
              "num_attention_heads": 4, "caption_projection_dim": 32, "joint_attention_dim": 32,
              "pooled_projection_dim": 64, "out_channels": 4}
    deeper = SD3Transformer2DModel(**{**kwargs, "num_layers": 3})
    peft_checkpoint(deeper, tmp_path / "deeper", patterns=False)
    wider = SD3Transformer2DModel(**{**kwargs, "attention_head_dim": 16})
    peft_checkpoint(wider, tmp_path / "wider", patterns=False)
    transformer = copy.deepcopy(backbone.transformer)
    with pytest.raises(ValueError, match=r"has weights for \d+ module\(s\) this transformer lacks \(e\.g\. "
                                         r"\['transformer_blocks\..*made for another base model"):
        load_lora(transformer, tmp_path / "deeper", "x")
    message = (r"does not fit this model: transformer_blocks\.0\.attn\.\S+ maps 32→32 features here, the "
               "adapter 64→64: it was made for another base model")
    with pytest.raises(ValueError, match=message):
        load_lora(transformer, tmp_path / "wider", "x")
    assert adapter_names(transformer) == []


def test_a_loader_that_drops_alpha_is_caught(backbone, peft_run, monkeypatch):
    """diffusers falls back to alpha = r when it does not get the config; the saved scale is checked
    after loading, and the half-loaded adapter is removed."""
    transformer = copy.deepcopy(backbone.transformer)
    real = transformer.load_lora_adapter
    monkeypatch.setattr(transformer, "load_lora_adapter",
                        lambda state, **kw: real(state, **{**kw, "metadata": None}))
    with pytest.raises(RuntimeError, match=r"was saved with r=4, scale 2 at transformer_blocks\.0\.attn\.\S+ "
                                           r"\(.*adapter_config\.json\) but loaded as r=4, scale 1"):
        load_lora(transformer, peft_run[1], "x")
    assert adapter_names(transformer) == []
