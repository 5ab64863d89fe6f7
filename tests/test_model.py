"""Model tests: shapes, gradients, checkpoint compatibility and numerical parity of the fast paths."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from models_mvg import (
    AUTHORS_MIN_VISIBLE_TARGET,
    MODELS,
    MVG,
    create_model,
    default_out_indices,
    mvg_vit_large_patch16,
    mvg_vit_tiny_patch16,
)

REFERENCE = Path(__file__).parent / "data" / "mvg_vit_large_patch16_state_dict.json"
CANVAS = (128, 64)  # 8x4 token grid: small enough for fast CPU tests, still two pairs stacked


def tiny(**kwargs) -> MVG:
    defaults = dict(input_size=CANVAS, depth=4)
    return mvg_vit_tiny_patch16(**{**defaults, **kwargs})


def random_batch(n=2, size=CANVAS, seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(n, 3, *size, generator=g)
    tgts = torch.randn(n, 3, *size, generator=g)
    return imgs, tgts


def with_random_rel_pos(model: MVG, seed=0) -> MVG:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.rel_pos_h.copy_(torch.randn(blk.attn.rel_pos_h.shape, generator=g) * 0.5)
            blk.attn.rel_pos_w.copy_(torch.randn(blk.attn.rel_pos_w.shape, generator=g) * 0.5)
    return model


# ---------------------------------------------------------------------------------------------------
# forward / backward


@pytest.mark.parametrize("depth", [4, 6, 12])
def test_forward_backward_every_parameter_learns(depth):
    torch.manual_seed(depth)
    model = tiny(depth=depth)
    imgs, tgts = random_batch()
    mask = model.ar_mask(2)
    loss, pred, out_mask = model(imgs, tgts, mask)
    assert torch.isfinite(loss)
    num_tokens = (CANVAS[0] // 16) * (CANVAS[1] // 16)
    assert pred.shape == (2, num_tokens, 16 * 16 * 3)
    assert out_mask.shape == (2, num_tokens) and out_mask.dtype == torch.bool
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_default_out_indices_are_quarter_ends():
    assert default_out_indices(24) == (5, 11, 17, 23)
    assert default_out_indices(12) == (2, 5, 8, 11)
    assert default_out_indices(4) == (0, 1, 2, 3)
    with pytest.raises(ValueError, match="depth"):
        default_out_indices(3)


def test_every_factory_builds_and_runs_at_a_non_default_size():
    imgs, tgts = random_batch(n=1, size=(64, 32))
    for name in MODELS:
        model = create_model(name, input_size=(64, 32), depth=4)
        loss, pred, _ = model(imgs, tgts)
        tokens = (64 // model.patch_size) * (32 // model.patch_size)
        assert pred.shape == (1, tokens, 3 * model.patch_size**2), name
        assert torch.isfinite(loss), name
    with pytest.raises(ValueError, match="unknown model"):
        create_model("mvg_vit_giant_patch16")


def test_window_attention_setting_is_honoured():
    model = tiny(window_size=2, window_block_indexes=(1,))
    assert model.blocks[1].window_size == 2 and model.blocks[1].attn.rel_pos_h.shape[0] == 3
    assert model.blocks[0].window_size == 0
    loss, _, _ = model(*random_batch())
    assert torch.isfinite(loss)


# ---------------------------------------------------------------------------------------------------
# the large model and its checkpoints


def test_large_model_matches_reference_keys_shapes_and_count():
    reference = json.loads(REFERENCE.read_text())
    with torch.device("meta"):
        model = mvg_vit_large_patch16()
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(shapes) == list(reference["state_dict"])
    assert shapes == reference["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == reference["num_params"] == 370_721_155
    assert model.out_indices == (5, 11, 17, 23) and model.merge_idx == 2
    assert isinstance(model.blocks[0].drop_path1, torch.nn.Identity)  # rate 0 at the first block
    assert math.isclose(model.blocks[-1].drop_path1.drop_prob, 0.1)


def test_state_dict_loads_strictly_into_a_fresh_model(tmp_path):
    source = tiny()
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": source.state_dict()}, path)
    target = tiny()
    target.load_state_dict(torch.load(path, weights_only=True)["model"], strict=True)
    imgs, tgts = random_batch()
    source.eval(), target.eval()
    torch.testing.assert_close(source.predict(imgs, tgts), target.predict(imgs, tgts))


# ---------------------------------------------------------------------------------------------------
# numerical parity of the fast paths


def loss_and_grads(model, imgs, tgts, mask, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # drop path draws
    loss, pred, _ = model(imgs, tgts, mask)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.detach(), pred.detach(), grads


def assert_same_run(a, b, atol=1e-5, rtol=1e-5):
    loss_a, pred_a, grads_a = a
    loss_b, pred_b, grads_b = b
    torch.testing.assert_close(loss_a, loss_b, atol=atol, rtol=rtol)
    torch.testing.assert_close(pred_a, pred_b, atol=atol, rtol=rtol)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=atol, rtol=rtol, msg=name)


def test_fused_and_eager_attention_agree():
    torch.manual_seed(0)
    model = with_random_rel_pos(tiny())
    imgs, tgts = random_batch()
    mask = model.ar_mask(2)
    model.set_fused_attn(True)
    fused = loss_and_grads(model, imgs, tgts, mask)
    model.set_fused_attn(False)
    eager = loss_and_grads(model, imgs, tgts, mask)
    assert_same_run(fused, eager)
    assert fused[2]["blocks.0.attn.rel_pos_h"].abs().sum() > 0


def test_activation_checkpointing_matches_plain_run_with_drop_path():
    torch.manual_seed(0)
    model = with_random_rel_pos(tiny(drop_path_rate=0.3))
    model.train()
    imgs, tgts = random_batch()
    mask = model.ar_mask(2)
    plain = loss_and_grads(model, imgs, tgts, mask, seed=7)
    model.set_grad_checkpointing(True)
    checkpointed = loss_and_grads(model, imgs, tgts, mask, seed=7)
    assert_same_run(plain, checkpointed)
    # The flag given at construction works the same way.
    built = tiny(drop_path_rate=0.3, use_act_checkpoint=True)
    built.load_state_dict(model.state_dict())
    assert_same_run(plain, loss_and_grads(built, imgs, tgts, mask, seed=7))


def test_attention_bias_is_decomposed_relative_position_from_unscaled_query():
    """Recompute one block's attention from the definition and compare with the model's."""
    torch.manual_seed(0)
    model = with_random_rel_pos(tiny(), seed=3)
    attn = model.blocks[0].attn
    gh, gw = model.grid_size
    x = torch.randn(1, gh, gw, model.embed_dim)
    heads, head_dim = attn.num_heads, attn.head_dim
    qkv = attn.qkv(x.reshape(1, gh * gw, -1)).reshape(gh * gw, 3, heads, head_dim)
    q, k, v = qkv.unbind(1)  # (L, heads, head_dim)
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    rel_h = attn.rel_pos_h[rows[:, None] - rows[None, :] + gh - 1]  # (L, L, head_dim)
    rel_w = attn.rel_pos_w[cols[:, None] - cols[None, :] + gw - 1]
    out = torch.empty(gh * gw, heads, head_dim)
    for h in range(heads):
        logits = (q[:, h] @ k[:, h].T) * head_dim**-0.5
        logits = logits + torch.einsum("ic,ijc->ij", q[:, h], rel_h) + torch.einsum("ic,ijc->ij", q[:, h], rel_w)
        out[:, h] = logits.softmax(-1) @ v[:, h]
    expected = attn.proj(out.reshape(gh * gw, -1)).reshape(1, gh, gw, -1)
    for fused in (True, False):
        model.set_fused_attn(fused)
        torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def cubic_weight(d, a=-0.75):
    d = abs(d)
    if d <= 1:
        return (a + 2) * d**3 - (a + 3) * d**2 + 1
    if d < 2:
        return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
    return 0.0


def bicubic_matrix(size_in, size_out):
    """Rows: output positions; half-pixel centres (align_corners=False), edge samples repeated."""
    matrix = np.zeros((size_out, size_in))
    scale = size_in / size_out
    for i in range(size_out):
        src = (i + 0.5) * scale - 0.5
        base = math.floor(src)
        for k in range(-1, 3):
            matrix[i, min(max(base + k, 0), size_in - 1)] += cubic_weight(src - (base + k))
    return matrix


@pytest.mark.parametrize("grid", [(8, 4), (56, 28), (14, 14), (6, 10)])
def test_position_embedding_resize_is_bicubic_without_antialias(grid):
    model = tiny()
    table = model.pos_embed[0, 1:].detach().double().numpy().reshape(14, 14, -1)
    rows, cols = bicubic_matrix(14, grid[0]), bicubic_matrix(14, grid[1])
    expected = np.einsum("ia,jb,abc->ijc", rows, cols, table)
    resized = model.abs_pos_embed(grid)[0].detach().double().numpy()
    np.testing.assert_allclose(resized, expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# masking, loss and inference semantics


def test_patchify_unpatchify_round_trip_on_non_square_canvases():
    model = tiny()
    for size in [(128, 64), (64, 128), (96, 48)]:
        imgs = torch.randn(2, 3, *size)
        patches = model.patchify(imgs)
        assert patches.shape == (2, size[0] * size[1] // 256, 768)
        torch.testing.assert_close(model.unpatchify(patches, (size[0] // 16, size[1] // 16)), imgs)
    # Token t of the patchified tensor is the t-th patch in raster order.
    imgs = torch.randn(1, 3, 128, 64)
    torch.testing.assert_close(model.patchify(imgs)[0, 5].reshape(16, 16, 3), imgs[0, :, 16:32, 16:32].permute(1, 2, 0))


def test_masked_query_target_cannot_leak_into_the_prediction():
    model = tiny().eval()
    imgs, tgts = random_batch()
    changed = tgts.clone()
    changed[:, :, CANVAS[0] // 2 :] = torch.randn_like(changed[:, :, CANVAS[0] // 2 :])
    torch.testing.assert_close(model.predict(imgs, tgts), model.predict(imgs, changed))
    # ...while the visible context target does steer it.
    changed[:, :, : CANVAS[0] // 2] += 1.0
    assert not torch.allclose(model.predict(imgs, tgts), model.predict(imgs, changed))


def test_loss_counts_only_masked_pixels_with_valid_weights():
    model = tiny()
    n, (h, w) = 2, CANVAS
    tgts = torch.zeros(n, 3, h, w)
    pred = torch.zeros(n, 3, h, w)
    mask = model.ar_mask(n)
    pred[:, :, : h // 2] = 5.0  # errors on the visible half do not count
    assert model.forward_loss(pred, tgts, mask).item() == 0.0
    pred[:, :, h // 2 :] = 1.0  # smooth-L1 with beta 0.01 of an error of 1 is 0.995
    masked_values = n * 3 * (h // 2) * w
    expected = 0.995 * masked_values / (masked_values + 1e-2)
    assert math.isclose(model.forward_loss(pred, tgts, mask).item(), expected, rel_tol=1e-6)
    valid = torch.ones_like(pred)
    valid[0] = 0.1
    pred[0, :, h // 2 :] = 3.0  # error 3 -> 2.995, weighted 0.1
    weights = masked_values / 2 * 1.1
    expected = (0.1 * 2.995 + 0.995) * masked_values / 2 / (weights + 1e-2)
    assert math.isclose(model.forward_loss(pred, tgts, mask, valid).item(), expected, rel_tol=1e-6)


def test_min_visible_target_drops_samples_per_pixel_at_any_resolution():
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    for size in [(128, 64), (256, 128)]:
        model = tiny(input_size=size, min_visible_target=0.01)
        raw = torch.zeros(2, 3, *size)
        raw[0, :, :4, :4] = 1.0  # a speck of foreground in the context: 16 of 4096+ pixels
        raw[1, :, : size[0] // 2] = 0.5  # a clearly visible context target
        tgts = (raw - mean) / std
        mask = model.ar_mask(2)
        visible = model.visible_target_mean(tgts, model.pixel_mask(mask, model.grid_size))
        expected_first = 16 / (size[0] // 2 * size[1])
        torch.testing.assert_close(visible, torch.tensor([expected_first, 0.5]), atol=1e-5, rtol=1e-4)
        pred = tgts.clone()
        pred[0, :, size[0] // 2 :] = 100.0  # only the dropped sample is wrong
        assert model.forward_loss(pred, tgts, mask).item() == 0.0
        model.min_visible_target = 0.0
        assert model.forward_loss(pred, tgts, mask).item() > 10.0
    # The authors' threshold is their sum of 300 spread over the visible half of an 896x448 canvas.
    assert math.isclose(AUTHORS_MIN_VISIBLE_TARGET * 3 * 448 * 448, 300.0)


def test_bad_inputs_give_clear_errors():
    model = tiny()
    imgs, tgts = random_batch()
    with pytest.raises(ValueError, match="same shape"):
        model(imgs, tgts[:, :, :64])
    with pytest.raises(ValueError, match="divisible by 16"):
        model(imgs[:, :, :120], tgts[:, :, :120])
    with pytest.raises(ValueError, match="bool_masked_pos"):
        model(imgs, tgts, torch.zeros(2, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="img_size"):
        MVG(img_size=(100, 64), embed_dim=64, depth=4, num_heads=2)
    with pytest.raises(ValueError, match="out_indices"):
        MVG(img_size=(128, 64), embed_dim=64, depth=4, num_heads=2, out_indices=(0, 1, 2))
    with pytest.raises(ValueError, match="merge_idx"):
        MVG(img_size=(128, 64), embed_dim=64, depth=4, num_heads=2, merge_idx=4)


def test_bf16_autocast_forward_backward():
    model = tiny()
    imgs, tgts = random_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, _ = model(imgs, tgts, model.ar_mask(2))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("out_indices", [None, (2, 3, 5, 7)])  # levels before the merge (at 2), or none
@pytest.mark.parametrize("num_prompts,ensemble", [(1, "features"), (3, "features"), (3, "outputs")])
def test_predict_paints_the_query_half_as_the_whole_canvas_decoder_does(out_indices, num_prompts, ensemble):
    torch.manual_seed(0)
    model = with_random_rel_pos(tiny(depth=8, out_indices=out_indices)).eval()
    imgs, tgts = random_batch(n=2 * num_prompts)
    share = num_prompts if ensemble == "features" else 1
    with torch.no_grad():
        mask = model.ar_mask(len(imgs), (CANVAS[0] // 16, CANVAS[1] // 16))
        canvas = model.forward_decoder(model.forward_encoder(imgs, tgts, mask, num_prompts=share))
    expected = canvas[:, :, CANVAS[0] // 2 :].view(2, num_prompts, 3, CANVAS[0] // 2, CANVAS[1]).mean(1)
    torch.testing.assert_close(model.predict(imgs, tgts, num_prompts, ensemble), expected, atol=1e-5, rtol=1e-5)


def test_prompt_ensembles():
    torch.manual_seed(0)
    model = with_random_rel_pos(tiny()).eval()
    imgs, tgts = random_batch(n=3)  # one query with three different context pairs
    half = CANVAS[0] // 2
    imgs[:, :, half:] = imgs[:1, :, half:]
    singles = model.predict(imgs, tgts)
    torch.testing.assert_close(model.predict(imgs, tgts, num_prompts=3, ensemble="outputs")[0], singles.mean(0))
    features = model.predict(imgs, tgts, num_prompts=3)
    assert features.shape == (1, 3, half, CANVAS[1])
    assert not torch.allclose(features[0], singles[0], atol=1e-4)
    order = torch.tensor([2, 0, 1])
    torch.testing.assert_close(model.predict(imgs[order], tgts[order], num_prompts=3), features)
    # The same context given three times is the single prediction.
    same = model.predict(imgs[:1].repeat(3, 1, 1, 1), tgts[:1].repeat(3, 1, 1, 1), num_prompts=3, ensemble="both")
    torch.testing.assert_close(same[0], singles[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="num_prompts"):
        model.predict(imgs, tgts, num_prompts=2)
    with pytest.raises(ValueError, match="ensemble"):
        model.predict(imgs, tgts, num_prompts=3, ensemble="vote")


def test_layer_decay_groups_follow_mae():
    """Embeddings lowest, block i at decay^(depth - i), everything new in MVG at the full rate."""
    from timm.optim import param_groups_layer_decay

    model = tiny()
    groups = param_groups_layer_decay(
        model, weight_decay=0.05, no_weight_decay_list=model.no_weight_decay(), layer_decay=0.8
    )
    names = {id(p): n for n, p in model.named_parameters()}
    scale = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    decay = {names[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}
    assert math.isclose(scale["pos_embed"], 0.8**5) and math.isclose(scale["patch_embed.proj.weight"], 0.8**5)
    for i in range(4):
        assert math.isclose(scale[f"blocks.{i}.attn.qkv.weight"], 0.8 ** (4 - i))
    for name in (
        "mask_token",
        "segment_token_x",
        "segment_token_y",
        "norm.weight",
        "decoder_embed.weight",
        "decoder_pred.0.weight",
    ):
        assert scale[name] == 1.0, name
    assert decay["blocks.0.attn.qkv.weight"] == 0.05 and decay["blocks.0.attn.qkv.bias"] == 0.0
    assert decay["pos_embed"] == decay["mask_token"] == decay["segment_token_x"] == decay["norm.weight"] == 0.0
    assert decay["blocks.0.attn.rel_pos_h"] == 0.05  # a 2D table: decayed, as in the authors' grouping


def test_per_sample_losses_come_from_the_same_sums():
    torch.manual_seed(0)
    model = tiny().eval()
    imgs, tgts = random_batch(n=3)
    mask = model.ar_mask(3).clone()
    mask[2] = False  # nothing hidden: no weight, no loss of its own
    loss, _, _, own = model(imgs, tgts, mask, return_per_sample=True)
    plain, _, _ = model(imgs, tgts, mask)
    torch.testing.assert_close(loss, plain)
    for i in range(2):
        alone, _, _ = model(imgs[i : i + 1], tgts[i : i + 1], mask[i : i + 1])
        torch.testing.assert_close(own[i], alone)
    assert torch.isnan(own[2]) and not own.requires_grad
