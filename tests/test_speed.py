"""Speed levers (opd.models.speed) change how the model runs, not what it computes: each is held to
the plain module's outputs, loss and gradients on the toy SD3 architecture (float32, CPU)."""
import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F
from torch import nn

from opd.bench import build, parse_args
from opd.models.lora import active_adapter
from opd.models.speed import (
    FP8Linear,
    attention_backend,
    compile_blocks,
    disable_fp8,
    enable_fp8,
    enable_gradient_checkpointing,
    merged_lora,
    to_fp8,
)

PROMPTS = ["prompt 1", "prompt 2"]


def module_for(*flags):
    """The bench's toy SD3 module (one teacher, CFG 4.5, 3 steps) with every LoRA B made clearly
    non-zero, identically for every module built (so teacher and student both differ from the base)."""
    module = build(parse_args(["--model", "sd3-tiny", "--batch", "2", "--steps", "3", *flags], "cpu"), "cpu",
                   torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(module.backbone.transformer.named_parameters()):
            if "lora_B" in _:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module


def states(module):
    traj = module.rollout_student(PROMPTS)
    return module.states(traj)


def student_grads(module, x, sigma, cond):
    for p in module.policy_parameters():
        p.grad = None
    v = module.velocity_under(module.STUDENT, x, sigma, cond, module.sampler.guidance_scale)
    (v * torch.linspace(-1, 1, v.numel()).reshape(v.shape)).sum().backward()
    return v.detach(), [p.grad.clone() for p in module.policy_parameters()]


def assert_grads_close(got, ref, rtol=1e-4):
    """Every parameter's gradient within ``rtol``, absolute slack relative to the largest gradient
    of all (a gradient far smaller than the rest carries the others' float32 rounding)."""
    scale = max(float(r.abs().max()) for r in ref)
    assert scale > 0
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=rtol, atol=rtol * 1e-1 * scale)


def test_merged_teacher_targets_equal_the_unmerged_ones_and_the_base_comes_back_exactly():
    module = module_for()
    tr, teacher = module.backbone.transformer, module.teachers[0]
    x, sigma, sigma_next, cond = states(module)
    before = {n: p.detach().clone() for n, p in tr.named_parameters()}
    storage = {n: p.data_ptr() for n, p in tr.named_parameters()}
    unmerged = module.teacher_targets(x, sigma, sigma_next, cond, teacher)
    base_only = module.means(x, sigma, sigma_next, cond, None, teacher.guidance_scale)[0]
    module.merge_teacher_lora = True
    merged = module.teacher_targets(x, sigma, sigma_next, cond, teacher)
    assert (unmerged - base_only).abs().max() > 1e-2  # the teacher's LoRA matters far beyond the tolerance
    assert (merged - unmerged).abs().max() < 1e-5
    for n, p in tr.named_parameters():  # bit for bit, same storage, same trainable set
        assert torch.equal(p.detach(), before[n]) and p.data_ptr() == storage[n], n
        assert p.requires_grad == (".student." in n), n
    assert tr.active_adapters() == ["student"]


def test_merged_lora_holds_w_plus_scaled_ba_inside_and_restores_on_error():
    module = module_for()
    tr, name = module.backbone.transformer, module.teachers[0].adapter_name
    layer = tr.transformer_blocks[0].attn.to_q
    w, a, b = (layer.base_layer.weight.detach().clone(), layer.lora_A[name].weight.detach().clone(),
               layer.lora_B[name].weight.detach().clone())
    x = torch.randn(3, w.shape[1])
    with pytest.raises(RuntimeError, match="inside"), merged_lora(tr, name, trainable="student"):
        torch.testing.assert_close(layer.base_layer.weight, w + layer.scaling[name] * b @ a, rtol=0, atol=1e-6)
        # every adapter off: the layer is the base architecture at the merged weight
        torch.testing.assert_close(layer(x), F.linear(x, w + layer.scaling[name] * b @ a, layer.base_layer.bias))
        raise RuntimeError("inside")
    assert torch.equal(layer.base_layer.weight, w)
    assert all(p.requires_grad for p in module.policy_parameters())
    delta = layer.scaling[name] * b @ a
    with torch.autocast("cpu", dtype=torch.bfloat16), merged_lora(tr, name):  # as inside the bench's iteration
        torch.testing.assert_close(layer.base_layer.weight - w, delta, rtol=1e-3, atol=1e-7)  # B A in float32
    with pytest.raises(ValueError, match="no LoRA adapter 'nope'"), merged_lora(tr, "nope"):
        pass


def test_in_bf16_merging_errs_no_more_than_the_unmerged_lora():
    """Stated tolerance for low precision: merging rounds ``W + ΔW`` to bf16 once, the unmerged
    path rounds the base and LoRA matmuls' outputs; against the float32 result, the merged teacher
    targets and student rollout err at most 1.25x as much as the unmerged ones (here both about 1 %)."""
    from opd.models.lora import cast_lora

    module = module_for()
    x, sigma, sigma_next, cond = states(module)
    teacher = module.teachers[0]
    truth = module.teacher_targets(x, sigma, sigma_next, cond, teacher)
    rollout_truth = module.rollout_student(PROMPTS).final
    module.backbone.to(torch.bfloat16)
    cast_lora(module.backbone.transformer, module.STUDENT, torch.float32)  # as the module keeps it

    def errors(merge):
        module.merge_teacher_lora = module.merge_rollout_lora = merge
        with torch.autocast("cpu", dtype=torch.bfloat16):
            targets = module.teacher_targets(x, sigma, sigma_next, cond, teacher).float()
            final = module.rollout_student(PROMPTS).final
        return [float((a - b).norm() / b.norm()) for a, b in ((targets, truth), (final, rollout_truth))]

    unmerged, merged = errors(False), errors(True)
    assert all(0 < u < 0.05 for u in unmerged)
    assert all(m <= 1.25 * u for m, u in zip(merged, unmerged)), (merged, unmerged)


@pytest.mark.parametrize("flags", [["--merge-teacher"], ["--merge-rollout"], ["--merge-teacher", "--merge-rollout"]])
def test_merge_options_leave_the_rollout_loss_and_gradients_unchanged(flags):
    def run(module):
        traj = module.rollout_student(PROMPTS)
        loss = module.distill_on(traj, module.teachers[0], backward=True)
        return traj.latents, loss, [p.grad.clone() for p in module.policy_parameters()]

    plain = module_for()
    latents, loss, grads = run(plain)
    with active_adapter(plain.backbone.transformer, None, trainable=plain.STUDENT):
        base_rollout = plain.rollout_student(PROMPTS).latents
    assert (latents - base_rollout).abs().max() > 1e-2  # the student's LoRA shapes its rollout
    merged = module_for(*flags)
    assert merged.merge_teacher_lora == ("--merge-teacher" in flags)
    assert merged.merge_rollout_lora == ("--merge-rollout" in flags)
    m_latents, m_loss, m_grads = run(merged)
    assert loss.item() > 0
    torch.testing.assert_close(m_latents, latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m_loss, loss, rtol=1e-5, atol=1e-7)
    assert_grads_close(m_grads, grads)


def test_compiled_blocks_give_the_same_velocity_and_gradients():
    module = module_for()
    x, sigma, _, cond = states(module)
    v_ref, g_ref = student_grads(module, x, sigma, cond)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")  # the wiring, without inductor's C++ build
    try:
        assert compile_blocks(module.backbone.transformer, backend=counter) == 2
        v, grads = student_grads(module, x, sigma, cond)
        assert counter.frame_count >= 1  # the blocks did run compiled
        torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-5)
        assert_grads_close(grads, g_ref)
        assert [n for n, _ in module.backbone.transformer.named_parameters() if "_orig_mod" in n] == []
    finally:
        torch._dynamo.reset()


def test_attention_backends_give_the_same_velocity_and_refuse_what_cannot_run():
    module = module_for()
    x, sigma, _, cond = states(module)
    v_default, g_default = student_grads(module, x, sigma, cond)
    for name in ("math", "flash"):
        with attention_backend(name):
            v, grads = student_grads(module, x, sigma, cond)
        torch.testing.assert_close(v, v_default, rtol=1e-5, atol=1e-5)
        assert_grads_close(grads, g_default)
    if not torch.cuda.is_available():  # the context really restricts SDPA: no memory-efficient kernel on a CPU
        with attention_backend("efficient"), pytest.raises(RuntimeError, match="No viable backend"):
            student_grads(module, x, sigma, cond)
    with pytest.raises(ValueError, match="one of"):
        attention_backend("xformers")


def test_gradient_checkpointing_recomputes_blocks_and_keeps_the_gradients():
    module = module_for()
    x, sigma, _, cond = states(module)
    block = module.backbone.transformer.transformer_blocks[0]
    calls = []
    block.register_forward_pre_hook(lambda *_: calls.append(1))  # recompute may stop early: count entries
    v_ref, g_ref = student_grads(module, x, sigma, cond)
    plain_calls = len(calls)
    enable_gradient_checkpointing(module.backbone.transformer)
    calls.clear()
    v, grads = student_grads(module, x, sigma, cond)
    assert plain_calls == 1 and len(calls) == 2  # forward, then again in backward
    torch.testing.assert_close(v, v_ref, rtol=0, atol=0)
    assert_grads_close(grads, g_ref, rtol=1e-5)


def scaled_mm_runs_here() -> bool:
    try:
        a = torch.ones(16, 16).to(torch.float8_e4m3fn)
        torch._scaled_mm(a, a.t(), scale_a=torch.tensor(1.0), scale_b=torch.tensor(1.0), out_dtype=torch.float32)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return True


@pytest.mark.skipif(not scaled_mm_runs_here(), reason="torch._scaled_mm has no kernel on this CPU")
def test_fp8_linear_is_the_matmul_of_the_quantised_operands_with_an_exact_input_gradient():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32).requires_grad_(False)
    w, bias = lin.weight.clone(), lin.bias.clone()
    x = torch.randn(3, 5, 64, requires_grad=True)
    lin.__class__ = FP8Linear
    y = lin(x)
    (xq, sx), (wq, sw) = to_fp8(x), to_fp8(w)
    expected = (xq.float() * sx) @ (wq.float() * sw).T + bias  # dequantised operands, float32 matmul
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    exact = F.linear(x, w, bias)
    err = float((y - exact).norm() / exact.norm())
    assert 1e-4 < err < 0.05  # it did quantise, to about e4m3's two significant digits
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, torch.ones(3, 5, 32) @ w)  # backward through the full-precision weight
    lin.weight.data = 2 * w  # a new weight (e.g. a merged LoRA) is quantised again
    torch.testing.assert_close(lin(x), 2 * (y - bias) + bias, rtol=1e-4, atol=1e-4)
    lin.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="frozen base only"):
        lin(x)


@pytest.mark.skipif(not scaled_mm_runs_here(), reason="torch._scaled_mm has no kernel on this CPU")
def test_fp8_on_the_transformer_converts_the_blocks_base_linears_and_undoes_cleanly():
    module = module_for()
    tr = module.backbone.transformer
    x, sigma, _, cond = states(module)
    v_ref, g_ref = student_grads(module, x, sigma, cond)
    names = enable_fp8(tr)
    assert names and not any("lora_" in n or ".norm" in n for n in names)
    assert "block0.attn.to_q.base_layer" in names and "block0.ff.net.2" in names
    v, grads = student_grads(module, x, sigma, cond)
    assert 1e-4 < float((v - v_ref).norm() / v_ref.norm()) < 0.05
    cos = [F.cosine_similarity(g.flatten(), r.flatten(), dim=0) for g, r in zip(grads, g_ref) if r.abs().max() > 0]
    assert min(cos) > 0.99
    disable_fp8(tr)
    assert not any(isinstance(m, FP8Linear) for m in tr.modules())
    torch.testing.assert_close(student_grads(module, x, sigma, cond)[0], v_ref, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp8_bench_module_on_a_gpu_stays_close_to_bf16():
    from opd.models.speed import fp8_supported

    if not fp8_supported("cuda"):
        pytest.skip("this GPU has no FP8 matmuls (compute capability < 8.9)")
    args = parse_args(["--model", "sd3-tiny", "--batch", "2", "--steps", "3"], "cuda")
    module = build(args, "cuda", torch.bfloat16)
    x, sigma, _, cond = states(module)
    v_ref, g_ref = student_grads(module, x, sigma, cond)
    enable_fp8(module.backbone.transformer)
    v, grads = student_grads(module, x, sigma, cond)
    assert 0 < float((v.float() - v_ref.float()).norm() / v_ref.float().norm()) < 0.05
    cos = [F.cosine_similarity(g.flatten(), r.flatten(), dim=0) for g, r in zip(grads, g_ref) if r.abs().max() > 0]
    assert min(cos) > 0.98
