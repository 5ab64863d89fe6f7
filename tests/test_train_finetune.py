"""--finetune: MAE, timm and MVG checkpoints loaded into the model with a report of every key, the
one-line refusal of weights that do not fit, and the training entry point starting from them."""

import argparse

import pytest
import timm
import torch

from models_mvg import create_model
from tests.helpers import run_training
from util import checkpoint
from util.cli import UsageError

# The keys of an MAE checkpoint that an MVG model takes nothing from.
MAE_SKIPPED = {
    "cls_token",
    "mask_token",
    "decoder_embed.weight",
    "decoder_embed.bias",
    "decoder_pos_embed",
    "decoder_blocks.0.norm1.weight",
    "decoder_norm.weight",
    "decoder_pred.weight",
    "decoder_pred.bias",
    "head.weight",
    "head.bias",
}


def mae_checkpoint(depth=4, dim=192, img_size=224):
    """A timm ViT with MAE's decoder keys added, in MAE's {'model': ...} layout."""
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=depth, img_size=img_size)
    state = vit.state_dict()
    decoder = 128
    state.update(
        {
            "mask_token": torch.zeros(1, 1, decoder),
            "decoder_embed.weight": torch.zeros(decoder, dim),
            "decoder_embed.bias": torch.zeros(decoder),
            "decoder_pos_embed": torch.zeros(1, 197, decoder),
            "decoder_blocks.0.norm1.weight": torch.ones(decoder),
            "decoder_norm.weight": torch.ones(decoder),
            "decoder_pred.weight": torch.zeros(16 * 16 * 3, decoder),
            "decoder_pred.bias": torch.zeros(768),
        }
    )
    return state


def assert_mae_loads_with_a_key_report(model, tmp_path):
    """Saves an MAE checkpoint as tmp_path/mae.pth, loads it into `model` and returns its weights."""
    mae = mae_checkpoint()
    torch.save({"model": mae}, tmp_path / "mae.pth")
    report = checkpoint.load_pretrained(model, str(tmp_path / "mae.pth"))
    assert not report.unexpected and not report.adapted
    assert len(report.loaded) == 5 + 4 * 12  # pos_embed, patch_embed (2), norm (2) + 12 per block
    assert {k for k, _ in report.skipped} == MAE_SKIPPED
    # MAE's mask_token and decoder_embed share our names but not our shapes: skipped above, so they
    # keep their initialisation like the keys a ViT checkpoint cannot have.
    assert set(report.missing) == {
        "segment_token_x",
        "segment_token_y",
        *[f"blocks.{i}.attn.rel_pos_{a}" for i in range(4) for a in "hw"],
        *[k for k in model.state_dict() if k.startswith("decoder_pred.")],
    }
    assert torch.equal(model.blocks[3].attn.qkv.weight, mae["blocks.3.attn.qkv.weight"])
    assert torch.equal(model.pos_embed, mae["pos_embed"])
    return mae


def assert_authors_layout_loads_at_another_canvas(model, tmp_path):
    """The authors' layout (MAE's save_model: the weights beside optimizer, epoch and an
    argparse.Namespace) at another canvas: everything loads; rel-pos tables are interpolated."""
    source = create_model("mvg_vit_tiny_patch16", input_size=(128, 32), depth=4)
    torch.save(
        {
            "model": source.state_dict(),
            "optimizer": {},
            "epoch": 3,
            "args": argparse.Namespace(model="mvg_vit_large_patch16"),
        },
        tmp_path / "mvg.pth",
    )
    report = checkpoint.load_pretrained(model, str(tmp_path / "mvg.pth"))
    assert not report.missing and not report.skipped and not report.unexpected
    assert sorted(k for k, _, _ in report.adapted) == sorted(f"blocks.{i}.attn.rel_pos_h" for i in range(4))
    assert torch.equal(model.decoder_embed.weight, source.decoder_embed.weight)


def assert_a_misfit_stops_in_one_line_unless_allowed(model, mae, tmp_path, capsys):
    """Anything else stops the run in one line with counts and an example, the keys listed on stdout,
    unless allowed."""
    bad = dict(mae, **{"blocks.7.attn.qkv.weight": torch.zeros(576, 192), "norm.weight": torch.ones(100)})
    torch.save({"model": bad}, tmp_path / "bad.pth")
    capsys.readouterr()
    with pytest.raises(UsageError) as error:
        checkpoint.load_pretrained(model, str(tmp_path / "bad.pth"))
    assert str(error.value) == (
        f"--finetune {tmp_path / 'bad.pth'} does not fit the model: 1 misshapen, 1 unknown weights, e.g. "
        "norm.weight (shape [100] vs model [192]) (all 2 listed on stdout); pass --allow_key_mismatch to keep "
        "those parameters initialised"
    )
    listed = capsys.readouterr().out
    assert "blocks.7.attn.qkv.weight: no such key" in listed
    assert "norm.weight: shape [100] vs model [192]" in listed
    report = checkpoint.load_pretrained(model, str(tmp_path / "bad.pth"), allow_mismatch=True)
    assert {k for k, _ in report.unexpected} == {"blocks.7.attn.qkv.weight", "norm.weight"}


def test_finetune_loads_mae_timm_and_mvg_checkpoints_with_a_key_report(tmp_path, mixed, capsys):
    model = create_model("mvg_vit_tiny_patch16", input_size=(64, 32), depth=4)
    mae = assert_mae_loads_with_a_key_report(model, tmp_path)

    # timm's bare state dict from a 256-pixel model: the position embedding is resampled to 14x14.
    torch.save(mae_checkpoint(img_size=256), tmp_path / "timm.pth")
    report = checkpoint.load_pretrained(model, str(tmp_path / "timm.pth"))
    assert report.adapted == [("pos_embed", (1, 257, 192), (1, 197, 192))]

    assert_authors_layout_loads_at_another_canvas(model, tmp_path)
    assert_a_misfit_stops_in_one_line_unless_allowed(model, mae, tmp_path, capsys)

    # Wired into main: the report is printed and training starts from those weights.
    capsys.readouterr()
    finetune = ["--finetune", str(tmp_path / "mae.pth")]
    run_training(tmp_path / "run", mixed, *finetune, "--batch_size", "2", "--samples_per_epoch", "4", "--epochs", "1")
    assert "finetune from" in capsys.readouterr().out
