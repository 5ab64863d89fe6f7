"""MVG, the Medical Vision Generalist: a ViT that paints the target of a query in context.

A sample is a pair of canvases of the same shape (896x448 for the paper's ViT-L):
    imgs: context image on top, query image below        (N, 3, H, W)
    tgts: context target on top, query target below      (N, 3, H, W)
Both are embedded by one patch embedding into (H/16, W/16) token grids. Target tokens under the mask
are replaced by a learned mask token; each stream gets its segment token and the absolute position
embedding. The first `merge_idx + 1` blocks see the two streams as one batch of 2N; after that they
are averaged into one stream. Four block outputs, normed by the same LayerNorm, are concatenated and
decoded by a per-token linear layer and a small convolutional head into a full-resolution target.
Every block attends globally with decomposed relative-position bias (rel_pos_attention.py).

The state-dict keys and shapes of `mvg_vit_large_patch16` are those of the authors' ViT-L (and of
Painter's), so their checkpoints load with strict=True.
"""

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm2d, PatchEmbed, resample_abs_pos_embed_nhwc, trunc_normal_
from timm.models.vision_transformer_sam import Block
from torch.utils.checkpoint import checkpoint

from rel_pos_attention import ATTENTION_PATHS, RelPosAttention

# The authors' rule drops a sample whose visible, un-normalised target sums to less than 300 on the
# 896x448 canvas with the query target masked (3 x 448 x 448 visible values). As a mean per visible
# value this is the threshold below; it is the value to pass as `min_visible_target` to reproduce it.
AUTHORS_MIN_VISIBLE_TARGET = 300.0 / (3 * 448 * 448)

# Added to the total weight a loss sum is divided by, so that a batch whose hidden pixels all weigh 0
# has loss 0 and a zero gradient instead of 0/0. It is negligible next to any real total: one hidden
# 16x16 token of 3 channels weighs 768, or 76.8 on segmentation background.
LOSS_WEIGHT_EPS = 1e-2


def default_out_indices(depth: int) -> tuple[int, ...]:
    """The last block of each quarter of the depth: (5, 11, 17, 23) at depth 24."""
    if depth < 4:
        raise ValueError(f"depth must be at least 4 to take four feature levels, got {depth}")
    return tuple(depth * (q + 1) // 4 - 1 for q in range(4))


def checked_layout(
    img_size: tuple[int, int], patch_size: int, depth: int, out_indices: Sequence[int] | None, merge_idx: int
) -> tuple[int, ...]:
    """Refuses a canvas that is not two stacked pairs of whole patches and block indices outside the
    depth; returns the four feature levels (out_indices, or the default for the depth)."""
    if img_size[0] % patch_size or img_size[1] % patch_size:
        raise ValueError(f"img_size {img_size} must be divisible by patch_size {patch_size}")
    if (img_size[0] // patch_size) % 2:
        raise ValueError(
            f"img_size height {img_size[0]} must hold an even number of patch rows "
            "(context pair on top, query pair below)"
        )
    out_indices = tuple(default_out_indices(depth) if out_indices is None else out_indices)
    if len(out_indices) != 4:
        raise ValueError(f"out_indices must name 4 blocks (the decoder takes 4 levels), got {out_indices}")
    if not 0 <= merge_idx < depth:
        raise ValueError(f"merge_idx {merge_idx} must be a block index in [0, {depth})")
    if any(not 0 <= i < depth for i in out_indices):
        raise ValueError(f"out_indices {out_indices} must be block indices in [0, {depth})")
    return out_indices


def build_blocks(
    depth: int,
    drop_path_rate: float,
    use_rel_pos: bool,
    window_size: int,
    window_block_indexes: Sequence[int],
    **block_options,
) -> nn.ModuleList:
    """timm's SAM-ViT blocks with drop path rising linearly to drop_path_rate, windowed where asked;
    with rel-pos, each block's attention is taken over by RelPosAttention (same weights, same keys)."""
    drop_path_rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
    blocks = nn.ModuleList(
        [
            Block(
                drop_path=drop_path_rates[i],
                use_rel_pos=use_rel_pos,
                window_size=window_size if i in window_block_indexes else 0,
                **block_options,
            )
            for i in range(depth)
        ]
    )
    if use_rel_pos:
        for blk in blocks:
            blk.attn = RelPosAttention(blk.attn)
    return blocks


def pixel_head(channels: int, out_chans: int) -> nn.Sequential:
    """The decoder's convolutional head on the full-resolution map: conv3x3, LayerNorm, GELU, conv1x1."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, kernel_size=3, padding=1),
        LayerNorm2d(channels, eps=1e-6),
        nn.GELU(),
        nn.Conv2d(channels, out_chans, kernel_size=1),
    )


def pretrain_pos_embed(embed_dim: int, pretrain_grid: int, cls_token: bool) -> nn.Parameter:
    """Absolute positions kept at the MAE pretraining size (and its class-token slot), so MAE
    checkpoints load unchanged; they are resized to the canvas grid every forward."""
    return nn.Parameter(torch.zeros(1, pretrain_grid**2 + int(cls_token), embed_dim))


class MVG(nn.Module):
    """In-context image-to-image ViT with decomposed relative position bias (see module docstring)."""

    def __init__(
        self,
        img_size=(896, 448),
        patch_size=16,
        in_chans=3,
        embed_dim=1024,
        depth=24,
        num_heads=16,
        mlp_ratio=4.0,
        qkv_bias=True,
        drop_path_rate=0.0,
        norm_layer=None,
        act_layer=nn.GELU,
        use_abs_pos=True,
        use_rel_pos=True,
        rel_pos_zero_init=True,
        window_size=0,
        window_block_indexes=(),
        use_act_checkpoint=False,
        pretrain_img_size=224,
        pretrain_use_cls_token=True,
        decoder_embed_dim=64,
        out_indices: Sequence[int] | None = None,
        merge_idx=2,
        loss_beta=0.01,
        min_visible_target=0.0,
    ):
        super().__init__()
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)  # the authors' norm, built per call
        img_size = tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size, img_size)
        self.out_indices = checked_layout(img_size, patch_size, depth, out_indices, merge_idx)
        self.img_size, self.patch_size, self.embed_dim = img_size, patch_size, embed_dim
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.decoder_embed_dim, self.merge_idx, self.loss_beta = decoder_embed_dim, merge_idx, loss_beta
        self.pretrain_use_cls_token, self.use_act_checkpoint = pretrain_use_cls_token, use_act_checkpoint
        self.min_visible_target = min_visible_target

        embed = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.patch_embed = PatchEmbed(**embed, output_fmt="NHWC", strict_img_size=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, embed_dim))
        self.segment_token_x = nn.Parameter(torch.zeros(1, 1, 1, embed_dim))
        self.segment_token_y = nn.Parameter(torch.zeros(1, 1, 1, embed_dim))
        self.pos_embed = (
            pretrain_pos_embed(embed_dim, pretrain_img_size // patch_size, pretrain_use_cls_token)
            if use_abs_pos
            else None
        )
        block = dict(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, norm_layer=norm_layer)
        block.update(act_layer=act_layer, input_size=self.grid_size)
        self.blocks = build_blocks(depth, drop_path_rate, use_rel_pos, window_size, window_block_indexes, **block)
        self.norm = norm_layer(embed_dim)
        self.decoder_embed = nn.Linear(4 * embed_dim, patch_size**2 * decoder_embed_dim)
        self.decoder_pred = pixel_head(decoder_embed_dim, in_chans)
        self._init_weights(use_rel_pos and not rel_pos_zero_init)
        self.set_attention("auto")

    def _init_weights(self, random_rel_pos: bool):
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=0.02)
        for token in (self.mask_token, self.segment_token_x, self.segment_token_y):
            nn.init.normal_(token, std=0.02)
        # Patch projection initialised like a linear layer, as in MAE.
        proj_weight = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(proj_weight.view(proj_weight.shape[0], -1))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if random_rel_pos:
            for blk in self.blocks:
                trunc_normal_(blk.attn.rel_pos_h, std=0.02)
                trunc_normal_(blk.attn.rel_pos_w, std=0.02)

    # ----------------------------------------------------------------------------------------------
    # switches and optimiser hooks

    def set_attention(self, path: str = "auto"):
        """How attention adds the rel-pos bias: one of ATTENTION_PATHS (all compute the same thing)."""
        if path not in ATTENTION_PATHS:
            raise ValueError(f"attention path must be one of {', '.join(ATTENTION_PATHS)}, got '{path}'")
        self.attention = path
        for blk in self.blocks:
            if isinstance(blk.attn, RelPosAttention):
                blk.attn.path = path
            else:  # timm's Attention of a model without rel-pos: no bias, only plain SDPA or eager
                blk.attn.fused_attn = path != "eager"

    def set_fused_attn(self, enabled: bool = True):
        """timm's two paths: 'fused' (SDPA with the bias as mask) or 'eager' (written out)."""
        self.set_attention("fused" if enabled else "eager")

    def set_grad_checkpointing(self, enable: bool = True):
        self.use_act_checkpoint = enable

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed", "mask_token", "segment_token_x", "segment_token_y"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        """Layer groups for layer-wise lr decay, as MAE/BEiT assign them: the patch and position
        embeddings lowest, one group per block, and a top group above the last block (full learning
        rate) for everything new in MVG: the final norm, the decoder, the mask and segment tokens."""
        return dict(
            stem=r"^pos_embed|^patch_embed",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm|^decoder|^mask_token|^segment_token", (99998,))],
        )

    # ----------------------------------------------------------------------------------------------
    # tensor layout helpers

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C), tokens in raster order, pixels (row, col, channel)."""
        n, c, h, w = imgs.shape
        p = self.patch_size
        x = imgs.reshape(n, c, h // p, p, w // p, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor, grid_size: tuple[int, int] | None = None) -> torch.Tensor:
        """(N, L, p*p*C) -> (N, C, H, W); grid_size (H/p, W/p) defaults to the model's canvas."""
        gh, gw = grid_size or self.grid_size
        n, length, dim = x.shape
        p = self.patch_size
        if length != gh * gw or dim % (p * p):
            raise ValueError(f"cannot unpatchify {tuple(x.shape)} onto a {gh}x{gw} grid of {p}x{p} patches")
        c = dim // (p * p)
        x = x.reshape(n, gh, gw, p, p, c)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(n, c, gh * p, gw * p)

    def abs_pos_embed(self, grid_size: tuple[int, int]) -> torch.Tensor:
        """The pretraining position embedding resized to the token grid: (1, Hp, Wp, D)."""
        pos = self.pos_embed[:, 1:] if self.pretrain_use_cls_token else self.pos_embed
        side = round(pos.shape[1] ** 0.5)
        pos = pos.reshape(1, side, side, -1)
        return resample_abs_pos_embed_nhwc(pos, list(grid_size), interpolation="bicubic", antialias=False)

    def ar_mask(self, batch_size: int, grid_size: tuple[int, int] | None = None, device=None) -> torch.Tensor:
        """Every query-target token (bottom half) masked: (N, Hp*Wp) bool."""
        gh, gw = grid_size or self.grid_size
        mask = torch.zeros(gh, gw, dtype=torch.bool, device=device)
        mask[gh // 2 :] = True
        return mask.flatten().expand(batch_size, -1)

    def _check_inputs(self, imgs, tgts, bool_masked_pos):
        if imgs.shape != tgts.shape:
            raise ValueError(f"imgs {tuple(imgs.shape)} and tgts {tuple(tgts.shape)} must have the same shape")
        if imgs.ndim != 4 or imgs.shape[2] % self.patch_size or imgs.shape[3] % self.patch_size:
            raise ValueError(
                f"expected canvases (N, C, H, W) with H and W divisible by {self.patch_size}, got {tuple(imgs.shape)}"
            )
        n, _, h, w = imgs.shape
        num_tokens = (h // self.patch_size) * (w // self.patch_size)
        if bool_masked_pos is None:
            return torch.zeros(n, num_tokens, dtype=torch.bool, device=imgs.device)
        mask = bool_masked_pos.flatten(1).to(device=imgs.device, dtype=torch.bool)
        if mask.shape != (n, num_tokens):
            raise ValueError(
                f"bool_masked_pos {tuple(bool_masked_pos.shape)} does not cover the "
                f"{h // self.patch_size}x{w // self.patch_size} token grid of {n} canvases"
            )
        return mask

    # ----------------------------------------------------------------------------------------------
    # the model

    def _run_block(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.use_act_checkpoint and torch.is_grad_enabled():
            # Non-reentrant checkpointing replays the saved RNG state, so drop path matches.
            return checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def forward_encoder(
        self, imgs: torch.Tensor, tgts: torch.Tensor, bool_masked_pos: torch.Tensor, num_prompts: int = 1
    ) -> list:
        """With num_prompts K > 1 the batch holds K canvases per query (query-major: the K contexts of
        query 0, then of query 1, ...) and, from the merge on, the query half of their features is
        averaged across the K after every block, so all prompts inform one query representation."""
        n = imgs.shape[0]
        xy = self.patch_embed(torch.cat((imgs, tgts)))  # (2N, Hp, Wp, D), one conv for both streams
        x, y = xy[:n], xy[n:]
        _, gh, gw, _ = x.shape
        masked = bool_masked_pos.reshape(n, gh, gw, 1).type_as(y)
        y = y * (1 - masked) + self.mask_token.type_as(y) * masked

        x = x + self.segment_token_x
        y = y + self.segment_token_y
        if self.pos_embed is not None:
            pos = self.abs_pos_embed((gh, gw))
            x = x + pos
            y = y + pos

        x = torch.cat((x, y))  # (2N, Hp, Wp, D): image stream then target stream
        features = []
        for idx, blk in enumerate(self.blocks):
            x = self._run_block(blk, x)
            if idx == self.merge_idx:
                x = 0.5 * (x[:n] + x[n:])  # (N, Hp, Wp, D)
            if num_prompts > 1 and idx >= self.merge_idx:
                x = self._share_query_half(x, num_prompts)
            if idx in self.out_indices:
                # A level taken before the merge (only in shallow models) is merged the same way.
                level = x if idx >= self.merge_idx else 0.5 * (x[:n] + x[n:])
                features.append(self.norm(level))
        return features  # 4 x (N, Hp, Wp, D)

    @staticmethod
    def _share_query_half(x: torch.Tensor, num_prompts: int) -> torch.Tensor:
        """(Q*K, Hp, Wp, D): the bottom-half tokens of each group of K replaced by their mean."""
        half = x.shape[1] // 2
        grouped = x.view(-1, num_prompts, *x.shape[1:])
        query = grouped[:, :, half:].mean(dim=1, keepdim=True).expand_as(grouped[:, :, half:])
        return torch.cat((grouped[:, :, :half], query), dim=2).view_as(x)

    def forward_decoder(self, features: list) -> torch.Tensor:
        x = self.decoder_embed(torch.cat(features, dim=-1))  # (N, Hp, Wp, p*p*Cd)
        return self.decoder_pred(self._pixel_features(x))  # (N, 3, H, W)

    def _pixel_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, rows, cols, p*p*Cd) per-token decoder features -> (N, Cd, rows*p, cols*p) pixels."""
        n, rows, cols, _ = x.shape
        p, cd = self.patch_size, self.decoder_embed_dim
        return x.reshape(n, rows, cols, p, p, cd).permute(0, 5, 1, 3, 2, 4).reshape(n, cd, rows * p, cols * p)

    def decode_query(self, features: list, shared_prompts: int = 1) -> torch.Tensor:
        """The query target alone, (N, 3, H/2, W), exactly as forward_decoder paints that half of
        the canvas, for a little over half its work. The pixel head's 3x3 convolution reaches one
        pixel across the border between the halves, so the context half's last token row is decoded
        too and cropped off. With shared_prompts K > 1 (features ensembled by forward_encoder) the
        query-half tokens of each group of K canvases are one and the same, and go through the
        decoder's linear layer once per group."""
        tokens = torch.cat(features, dim=-1)  # (N, Hp, Wp, 4D)
        half = tokens.shape[1] // 2
        border = self.decoder_embed(tokens[:, half - 1 : half])  # (N, 1, Wp, p*p*Cd)
        if shared_prompts > 1 and min(self.out_indices) >= self.merge_idx:
            query = self.decoder_embed(tokens[::shared_prompts, half:])  # (N/K, Hp/2, Wp, p*p*Cd)
            query = query.repeat_interleave(shared_prompts, dim=0)
        else:  # a level taken before the merge is not shared across the group
            query = self.decoder_embed(tokens[:, half:])
        pixels = self._pixel_features(torch.cat((border, query), dim=1))
        return self.decoder_pred(pixels)[:, :, self.patch_size :]

    def pixel_mask(self, bool_masked_pos: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        """Token mask (N, L) -> pixel mask (N, 1, H, W) as float."""
        n = bool_masked_pos.shape[0]
        mask = bool_masked_pos.reshape(n, 1, *grid_size).float()
        return mask.repeat_interleave(self.patch_size, 2).repeat_interleave(self.patch_size, 3)

    def loss_weights(
        self, tgts: torch.Tensor, bool_masked_pos: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Each target value's weight in the loss, (N, C, H, W): 1 where the token is hidden, times
        `valid` (N, C, H, W) or (N, 1, H, W), and 0 for every value of a sample that
        `min_visible_target` drops.

        With `min_visible_target` > 0, a sample whose visible (unmasked) target has a mean
        un-normalised intensity (0..1, over visible pixels and channels) below it is left out of the
        loss. Defined per pixel, it means the same at every canvas size; the authors' sum-based rule
        is AUTHORS_MIN_VISIBLE_TARGET at 896x448 with the query target masked.

        The weights depend on the batch alone, not on the prediction, so training can total the
        weight of a whole global batch before its first forward pass.
        """
        grid_size = (tgts.shape[2] // self.patch_size, tgts.shape[3] // self.patch_size)
        mask = self.pixel_mask(bool_masked_pos, grid_size)  # (N, 1, H, W)
        weight = mask.expand_as(tgts)
        if valid is not None:
            weight = weight * valid.float()
        if self.min_visible_target > 0:
            keep = self.visible_target_mean(tgts, mask) >= self.min_visible_target
            weight = weight * keep.float().view(-1, 1, 1, 1)
        return weight

    def forward_loss(
        self,
        pred: torch.Tensor,
        tgts: torch.Tensor,
        bool_masked_pos: torch.Tensor,
        valid: torch.Tensor | None = None,
        per_sample: bool = False,
        divisor: torch.Tensor | None = None,
    ):
        """Smooth-L1 over hidden pixels, weighted by loss_weights, summed and divided by `divisor`.

        By default the divisor is this batch's own weight (+ LOSS_WEIGHT_EPS): the weighted mean over
        the batch. Training passes the weight of its whole global batch instead, so that however that
        batch is split into micro-batches and ranks, their gradients add up to those of its mean.

        With per_sample, also each sample's own weighted mean (N,), detached, NaN for a sample without
        weight, from the same sums (per-task logging then costs nothing extra).
        """
        weight = self.loss_weights(tgts, bool_masked_pos, valid)
        loss = F.smooth_l1_loss(pred.float(), tgts.float(), reduction="none", beta=self.loss_beta)
        sample_sums = (loss * weight).sum(dim=(1, 2, 3))  # (N,)
        sample_weights = weight.sum(dim=(1, 2, 3))
        if divisor is None:
            divisor = sample_weights.sum() + LOSS_WEIGHT_EPS
        total = sample_sums.sum() / divisor
        if not per_sample:
            return total
        with torch.no_grad():
            own = sample_sums / (sample_weights + LOSS_WEIGHT_EPS)
            own = torch.where(sample_weights > 0, own, torch.full_like(own, float("nan")))
        return total, own

    @staticmethod
    def visible_target_mean(tgts: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
        """Mean un-normalised target value over unmasked pixels, per sample: (N,)."""
        mean = tgts.new_tensor(IMAGENET_DEFAULT_MEAN).view(1, -1, 1, 1)
        std = tgts.new_tensor(IMAGENET_DEFAULT_STD).view(1, -1, 1, 1)
        raw = tgts.float() * std + mean
        visible = 1 - pixel_mask
        total = (raw * visible).sum(dim=(1, 2, 3))
        count = visible.sum(dim=(1, 2, 3)) * tgts.shape[1]
        return total / count.clamp(min=1)

    def forward(
        self,
        imgs: torch.Tensor,
        tgts: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        return_per_sample: bool = False,
        loss_divisor: torch.Tensor | None = None,
    ):
        """Returns (loss, pred patchified (N, L, p*p*3), mask (N, L) bool), and with return_per_sample
        each sample's loss (N,) last (see forward_loss).

        The loss is the weighted mean over this batch, unless `loss_divisor` (a 0-dim tensor) is given:
        then the batch's weighted loss sum is divided by it (training's global-batch normalisation).
        It is a tensor rather than a float so that a compiled model sees no new constant every step.
        """
        mask = self._check_inputs(imgs, tgts, bool_masked_pos)
        pred = self.forward_decoder(self.forward_encoder(imgs, tgts, mask))
        if return_per_sample:
            loss, per_sample = self.forward_loss(pred, tgts, mask, valid, per_sample=True, divisor=loss_divisor)
            return loss, self.patchify(pred), mask, per_sample
        return self.forward_loss(pred, tgts, mask, valid, divisor=loss_divisor), self.patchify(pred), mask

    @torch.no_grad()
    def predict(self, imgs: torch.Tensor, tgts: torch.Tensor, num_prompts: int = 1, ensemble: str = "features"):
        """Inference: the predicted query target in normalised units, (N / num_prompts, 3, H/2, W).

        The whole query target (bottom half) is masked, so `tgts` only needs the context target on
        top. Several prompts per query (batch ordered query-major, K = num_prompts canvases per
        query): ensemble 'features' averages the query-half features across prompts after the merge,
        'outputs' averages the K predictions, 'both' does both.
        """
        if ensemble not in ("features", "outputs", "both"):
            raise ValueError(f"ensemble must be 'features', 'outputs' or 'both', got '{ensemble}'")
        n, _, h, w = imgs.shape
        if num_prompts < 1 or n % num_prompts:
            raise ValueError(f"a batch of {n} canvases does not split into groups of num_prompts={num_prompts}")
        mask = self._check_inputs(
            imgs, tgts, self.ar_mask(n, (h // self.patch_size, w // self.patch_size), imgs.device)
        )
        share = num_prompts if ensemble in ("features", "both") else 1
        pred = self.decode_query(self.forward_encoder(imgs, tgts, mask, num_prompts=share), shared_prompts=share)
        return pred.view(n // num_prompts, num_prompts, *pred.shape[1:]).mean(dim=1)


# What every factory starts from: 16x16 patches, MLP ratio 4, biased qkv, as in the authors' ViT-L.
COMMON_SETTINGS = dict(patch_size=16, mlp_ratio=4, qkv_bias=True)


def _mvg(input_size, overrides: dict, **size) -> MVG:
    """The model of a factory: its size settings, with the caller's keyword arguments on top."""
    return MVG(img_size=tuple(input_size), **{**COMMON_SETTINGS, **size, **overrides})


def mvg_vit_large_patch16(input_size=(896, 448), **kwargs) -> MVG:
    """The paper's model: ViT-L/16, 370,721,155 parameters at 896x448."""
    return _mvg(input_size, kwargs, embed_dim=1024, depth=24, num_heads=16, drop_path_rate=0.1, decoder_embed_dim=64)


def mvg_vit_base_patch16(input_size=(896, 448), **kwargs) -> MVG:
    return _mvg(input_size, kwargs, embed_dim=768, depth=12, num_heads=12, drop_path_rate=0.1, decoder_embed_dim=64)


def mvg_vit_small_patch16(input_size=(896, 448), **kwargs) -> MVG:
    return _mvg(input_size, kwargs, embed_dim=384, depth=12, num_heads=6, drop_path_rate=0.05, decoder_embed_dim=32)


def mvg_vit_tiny_patch16(input_size=(896, 448), **kwargs) -> MVG:
    """For CPU demos and tests: ViT-Ti/16 with a slimmer pixel decoder."""
    return _mvg(input_size, kwargs, embed_dim=192, depth=12, num_heads=3, drop_path_rate=0.0, decoder_embed_dim=16)


def mvg_vit_tiny_patch8(input_size=(896, 448), **kwargs) -> MVG:
    """ViT-Ti with 8x8 patches: a patch's 192 pixel values fit its 192-wide token, so fine detail
    (a 2 mm cortical ribbon, the texture a denoiser keeps) can pass through on a small canvas."""
    settings = dict(embed_dim=192, depth=12, num_heads=3, drop_path_rate=0.0, decoder_embed_dim=16, patch_size=8)
    return _mvg(input_size, kwargs, **settings)


MODELS = {
    fn.__name__: fn
    for fn in (
        mvg_vit_large_patch16,
        mvg_vit_base_patch16,
        mvg_vit_small_patch16,
        mvg_vit_tiny_patch16,
        mvg_vit_tiny_patch8,
    )
}


def create_model(name: str, **kwargs) -> MVG:
    """Builds a model by factory name, with a clear error for an unknown one."""
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; choose one of {', '.join(MODELS)}")
    return MODELS[name](**kwargs)
