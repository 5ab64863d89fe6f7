"""Attention paths: every way of adding the decomposed rel-pos bias computes what timm's eager path does.

The model runs at tiny sizes with random, non-zero rel-pos tables, no dropout or drop path, and a
batch masked the way training masks it (one AR half mask, one MIM block mask). Each path is compared
with 'eager' on the loss, the prediction and the gradient of every parameter and of both inputs.
FlexAttention has no backward on the CPU; its gradients are checked only where CUDA is present.
"""

import math

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import rel_pos_attention
from masking_generator import MaskingGenerator, ar_mask
from models_mvg import mvg_vit_tiny_patch16
from rel_pos_attention import ATTENTION_PATHS, choose_attention

# (canvas, build options): a 4x2 token grid, a 6x5 one (odd width, rows != 2 x columns), and a model
# with a windowed block (2x2 windows and their own 3-entry tables).
MODELS = {
    "64x32": ((64, 32), {}),
    "96x80": ((96, 80), {}),
    "64x32-windowed": ((64, 32), dict(window_size=2, window_block_indexes=(1,))),
}
# The new path on every model; timm's fused path and 'auto' on one each.
CPU_CASES = [("augmented", name) for name in MODELS] + [("fused", "96x80"), ("auto", "64x32")]
CUDA = torch.cuda.is_available()


def tiny_model(canvas, dtype=torch.float32, **options):
    torch.manual_seed(0)
    model = mvg_vit_tiny_patch16(input_size=canvas, depth=4, drop_path_rate=0.0, **options)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.rel_pos_h.copy_(torch.randn(blk.attn.rel_pos_h.shape, generator=g) * 0.5)
            blk.attn.rel_pos_w.copy_(torch.randn(blk.attn.rel_pos_w.shape, generator=g) * 0.5)
    return model.to(dtype)


def hybrid_batch(model, dtype=torch.float32, device="cpu"):
    """Two canvases: the first with the AR half mask, the second with MIM block masking."""
    grid = model.grid_size
    g = torch.Generator().manual_seed(2)
    imgs = torch.randn(2, 3, *model.img_size, generator=g, dtype=dtype)
    tgts = torch.randn(2, 3, *model.img_size, generator=g, dtype=dtype)
    block_mask = MaskingGenerator(grid, grid[0] * grid[1] // 3, min_num_patches=1)(np.random.default_rng(3))
    mask = torch.from_numpy(np.stack([ar_mask(grid), block_mask])).flatten(1)
    return imgs.to(device), tgts.to(device), mask.to(device)


def train_results(model, imgs, tgts, mask, path):
    """Loss, prediction and the gradients of every parameter and of both inputs, on one path."""
    model.set_attention(path)
    model.zero_grad(set_to_none=True)
    imgs, tgts = imgs.clone().requires_grad_(), tgts.clone().requires_grad_()
    loss, pred, _ = model(imgs, tgts, mask)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    grads.update(imgs=imgs.grad, tgts=tgts.grad)
    return loss.detach(), pred.detach(), grads


def assert_same(results, reference, atol, rtol):
    loss, pred, grads = results
    ref_loss, ref_pred, ref_grads = reference
    torch.testing.assert_close(loss, ref_loss, atol=atol, rtol=rtol)
    torch.testing.assert_close(pred, ref_pred, atol=atol, rtol=rtol)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=atol, rtol=rtol, msg=name)


def encoder_results(model, imgs, tgts, mask, path):
    """The four encoder levels and the gradients of a random projection of them: a check below the
    loss, which computes in fp32 whatever the model's dtype."""
    model.set_attention(path)
    model.zero_grad(set_to_none=True)
    imgs = imgs.clone().requires_grad_()
    features = torch.stack(model.forward_encoder(imgs, tgts, mask))
    weights = torch.randn(features.shape, generator=torch.Generator().manual_seed(4), dtype=features.dtype)
    (features * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    grads.update(imgs=imgs.grad)
    return features.detach(), grads


# ---------------------------------------------------------------------------------------------------
# exactness against the eager reference


@pytest.mark.parametrize("path, model_name", CPU_CASES)
def test_path_matches_eager_forward_and_gradients_fp32(path, model_name):
    canvas, options = MODELS[model_name]
    model = tiny_model(canvas, **options)
    batch = hybrid_batch(model)
    reference = train_results(model, *batch, "eager")
    assert_same(train_results(model, *batch, path), reference, atol=1e-5, rtol=1e-5)
    assert reference[2]["blocks.0.attn.rel_pos_h"].abs().sum() > 0
    assert reference[2]["blocks.3.attn.rel_pos_w"].abs().sum() > 0


@pytest.mark.parametrize("path", ("fused", "augmented"))
def test_path_matches_eager_encoder_and_gradients_fp64(path):
    model = tiny_model((96, 80), dtype=torch.float64)
    batch = hybrid_batch(model, dtype=torch.float64)
    features, grads = encoder_results(model, *batch, path)
    ref_features, ref_grads = encoder_results(model, *batch, "eager")
    torch.testing.assert_close(features, ref_features, atol=1e-10, rtol=1e-10)
    assert grads.keys() == ref_grads.keys() and "blocks.0.attn.rel_pos_h" in grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-10, rtol=1e-10, msg=name)


@pytest.mark.parametrize("model_name", ("64x32", "96x80"))
@pytest.mark.parametrize("path", ("flex", "fused", "augmented"))
def test_forward_without_gradients_matches_eager(path, model_name):
    """Inference takes other kernels (the CPU flash kernel with a mask for 'fused'); FlexAttention is
    checked here only, as it has no CPU backward (the CUDA test below covers its gradients)."""
    canvas, options = MODELS[model_name]
    model = tiny_model(canvas, **options)
    imgs, tgts, mask = hybrid_batch(model)
    with torch.no_grad():
        outputs = {}
        for name in (path, "eager"):
            model.set_attention(name)
            outputs[name] = model(imgs, tgts, mask)[:2]
    torch.testing.assert_close(outputs[path], outputs["eager"], atol=1e-5, rtol=1e-5)


def test_augmented_needs_no_math_kernel_on_cpu():
    """Padding v to the width of q' and k' is what lets the CPU flash kernel run forward and
    backward; with the math kernel disallowed, any fallback would raise."""
    model = tiny_model((96, 80))
    imgs, tgts, mask = hybrid_batch(model)
    model.set_attention("augmented")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        loss, _, _ = model(imgs, tgts, mask)
        loss.backward()
    assert model.blocks[0].attn.rel_pos_h.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------
# the tests can fail: a bias with a wrong sign or a transposed table is caught


def sabotaged_logit_terms(kind):
    correct = rel_pos_attention.rel_pos_logit_terms

    def terms(q, rel_pos_h, rel_pos_w, grid):
        if kind == "negated":
            rel_pos_h = -rel_pos_h
        else:  # reversed relative distances: table_h[i, j] read as table_h[j, i]
            rel_pos_h = rel_pos_h.flip(0)
        return correct(q, rel_pos_h, rel_pos_w, grid)

    return terms


@pytest.mark.parametrize("kind", ("negated", "transposed"))
def test_a_wrong_bias_breaks_the_comparison(kind, monkeypatch):
    model = tiny_model((96, 80))
    batch = hybrid_batch(model)
    reference = train_results(model, *batch, "eager")
    monkeypatch.setattr(rel_pos_attention, "rel_pos_logit_terms", sabotaged_logit_terms(kind))
    with pytest.raises(AssertionError):
        assert_same(train_results(model, *batch, "augmented"), reference, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# the setting


def test_set_attention_validates_and_set_fused_attn_maps_to_timm_paths():
    model = tiny_model((64, 32))
    assert model.attention == "auto" and {blk.attn.path for blk in model.blocks} == {"auto"}
    for path in ATTENTION_PATHS:
        model.set_attention(path)
        assert model.attention == path and {blk.attn.path for blk in model.blocks} == {path}
    model.set_fused_attn(False)
    assert model.attention == "eager"
    model.set_fused_attn(True)
    assert model.attention == "fused"
    with pytest.raises(ValueError, match="attention path"):
        model.set_attention("sparse")


def test_auto_rule():
    many, few = rel_pos_attention.AUGMENTED_MIN_TOKENS, rel_pos_attention.AUGMENTED_MIN_TOKENS - 1
    assert choose_attention("cpu", torch.float32, needs_grad=True, tokens=many) == "augmented"
    assert choose_attention("cpu", torch.float32, needs_grad=True, tokens=few) == "eager"
    assert choose_attention("cpu", torch.float32, needs_grad=False, tokens=many) == "fused"
    for needs_grad in (True, False):
        assert choose_attention("cpu", torch.bfloat16, needs_grad, many) == "eager"
        assert choose_attention("cuda", torch.bfloat16, needs_grad, few) == "augmented"
        assert choose_attention("mps", torch.float32, needs_grad, many) == "fused"


def test_auto_follows_autocast_and_grad_mode(monkeypatch):
    chosen = []
    real_choice = rel_pos_attention.choose_attention

    def recorded_choice(*key):
        chosen.append(key)
        return real_choice(*key)

    monkeypatch.setattr(rel_pos_attention, "choose_attention", recorded_choice)
    model = tiny_model((64, 32))
    imgs, tgts, mask = hybrid_batch(model)
    model(imgs, tgts, mask)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(imgs, tgts, mask)
    tokens = math.prod(model.grid_size)
    assert set(chosen) == {("cpu", torch.float32, True, tokens), ("cpu", torch.bfloat16, False, tokens)}


def test_model_without_rel_pos_keeps_timm_attention():
    torch.manual_seed(0)
    model = mvg_vit_tiny_patch16(input_size=(64, 32), depth=4, use_rel_pos=False)
    imgs, tgts, mask = hybrid_batch(model)
    outputs = []
    for path in ("augmented", "eager"):
        model.set_attention(path)
        outputs.append(model(imgs, tgts, mask)[1])
    assert not model.blocks[0].attn.fused_attn
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# CUDA: gradients through FlexAttention, and the fused kernels the new paths are for


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("path", ("augmented", "flex"))
def test_cuda_path_matches_eager_forward_and_gradients(path):
    model = tiny_model((96, 80)).cuda()
    batch = hybrid_batch(model, device="cuda")
    # fp32 throughout: cuDNN's default TF32 convolutions would blur the comparison in the decoder.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        reference = train_results(model, *batch, "eager")
        results = train_results(model, *batch, path)
    # The fused kernels sum in another order than the eager matmuls.
    assert_same(results, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_augmented_bf16_training_uses_a_fused_kernel():
    model = tiny_model((96, 80)).cuda()
    imgs, tgts, mask = hybrid_batch(model, device="cuda")
    model.set_attention("augmented")
    fused_only = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    with sdpa_kernel(fused_only), torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _, _ = model(imgs, tgts, mask)
    loss.backward()
    assert torch.isfinite(loss)
