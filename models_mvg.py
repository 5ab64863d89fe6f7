"""MVG, the Medical Vision Generalist: a ViT that paints the target of a query in context.

A sample is a pair of canvases of the same shape (896x448 for the paper's ViT-L):
    imgs: context image on top, query image below        (N, 3, H, W)
    tgts: context target on top, query target below      (N, 3, H, W)
Both are embedded by one patch embedding into (H/16, W/16) token grids. Target tokens under the mask
are replaced by a learned mask token; each stream gets its segment token and the absolute position
embedding. The first `merge_idx + 1` blocks see the two streams as one batch of 2N; after that they
are averaged into one stream. Four block outputs, normed by the same LayerNorm, are concatenated and
decoded by a per-token linear layer and a small convolutional head into a full-resolution target.

The state-dict keys and shapes of `mvg_vit_large_patch16` are those of the authors' ViT-L (and of
Painter's), so their checkpoints load with strict=True.
"""
from functools import cache, partial
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm2d, PatchEmbed, resample_abs_pos_embed_nhwc, trunc_normal_
from timm.models.vision_transformer_sam import (
    Attention, Block, get_decomposed_rel_pos_bias, get_rel_pos,
)
from torch.nn.attention.flex_attention import flex_attention
from torch.utils.checkpoint import checkpoint

# The authors' rule drops a sample whose visible, un-normalised target sums to less than 300 on the
# 896x448 canvas with the query target masked (3 x 448 x 448 visible values). As a mean per visible
# value this is the threshold below; it is the value to pass as `min_visible_target` to reproduce it.
AUTHORS_MIN_VISIBLE_TARGET = 300.0 / (3 * 448 * 448)

# Added to the total weight a loss sum is divided by, so that a batch whose hidden pixels all weigh 0
# has loss 0 and a zero gradient instead of 0/0. It is negligible next to any real total: one hidden
# 16x16 token of 3 channels weighs 768, or 76.8 on segmentation background.
LOSS_WEIGHT_EPS = 1e-2


# ---------------------------------------------------------------------------------------------------
# attention with decomposed relative-position bias
#
# Every block attends globally over its L = Hp*Wp tokens (1568 at 896x448; the image and target
# streams are separate batch elements, not one sequence). Query i's logit for key j is
#     scale * q_i.k_j + q_i.Rh[row(i), row(j)] + q_i.Rw[col(i), col(j)]
# with the unscaled query in the bias terms (timm's get_decomposed_rel_pos_bias, from MViTv2). The
# paths differ only in how those bias terms reach the softmax:
#   fused      timm's: the dense (B*heads, L, L) bias as additive mask of scaled_dot_product_attention
#              on 3-D (B*heads, L, d) tensors. No fused CUDA kernel takes 3-D inputs, so on CUDA
#              this is the math kernel; the CPU flash kernel takes no mask that needs a gradient,
#              so CPU training runs the math kernel too, CPU inference the flash kernel.
#   eager      timm's: softmax(q k^T * scale + bias) v written out, the reference.
#   augmented  the bias folded into the dot product: q' = [q * scale, q.Rh per key row, q.Rw per key
#              column], k' = [k, one-hot of the key's row, one-hot of its column], attention with
#              scale 1 and no mask. Nothing of size L x L is built outside the kernel.
#   flex       FlexAttention (compiled) adding q.Rh and q.Rw per score in a score_mod; PyTorch has
#              no FlexAttention backward on the CPU.
#   auto       chosen per call by choose_attention from the device, dtype and grad mode.
ATTENTION_PATHS = ('auto', 'fused', 'eager', 'augmented', 'flex')

# The fused CUDA kernels need head widths in multiples of 8 (16-bit) or 4 (fp32); the zero padding of
# q' and k' adds nothing to the logits.
AUGMENTED_WIDTH_MULTIPLE = 8


def choose_attention(device_type: str, dtype: torch.dtype, needs_grad: bool) -> str:
    """The path 'auto' takes. Tiny model at 896x448, batch 2, 2 shared CPU cores, seconds per
    training step / forward, medians of paths run in turns (bench/README.md, "Attention paths"):

        device  dtype       training   no gradients  measured
        CPU     fp32        augmented  fused         augmented 5.39 / 1.66, fused 5.76 / 1.55,
                                                     eager 5.76 / 2.36; augmented -23% peak memory
        CPU     16-bit      eager      eager         bf16: eager 2.57 / 0.95, augmented 3.98 /
                                                     1.31, fused 4.54 / 1.16 (fp16 not measured)
        CUDA    any         augmented  augmented     not yet: see below
        other   any         fused      fused         timm's default, not measured

    On CUDA the choice is reasoned until bench/gpu_check.sh has timed the paths: 'augmented' leaves
    attention to the memory-efficient kernel with nothing of size L x L outside it, where timm's
    'fused' runs the math kernel on a dense bias (and its gradient) per block.
    """
    if device_type == 'cuda':
        return 'augmented'
    if device_type != 'cpu':
        return 'fused'
    if dtype in (torch.bfloat16, torch.float16):
        return 'eager'
    return 'augmented' if needs_grad else 'fused'


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the attention computes in: autocast's where it is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


@cache
def compiled_flex_attention():
    """flex_attention is fast only compiled; one compiled function serves every block and shape."""
    return torch.compile(flex_attention, dynamic=False)


def rel_pos_logit_terms(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                        grid: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each query's bias terms per key row and per key column, from the unscaled query:
    (B, heads, L, Hp) and (B, heads, L, Wp). The dense bias would be their sum over all (row, col)."""
    gh, gw = grid
    table_h = get_rel_pos(gh, gh, rel_pos_h)  # (Hp query rows, Hp key rows, d), resized if need be
    table_w = get_rel_pos(gw, gw, rel_pos_w)  # (Wp query cols, Wp key cols, d)
    q_grid = q.unflatten(2, (gh, gw))  # (B, heads, Hp, Wp, d)
    by_row = torch.einsum('bnhwc,hkc->bnhwk', q_grid, table_h).flatten(2, 3)
    by_col = torch.einsum('bnhwc,wkc->bnhwk', q_grid, table_w).flatten(2, 3)
    return by_row.to(q.dtype), by_col.to(q.dtype)


def key_position_one_hot(grid: Tuple[int, int], padding: int, like: torch.Tensor) -> torch.Tensor:
    """(L, Hp + Wp + padding): each key's row and column as one-hot codes, then zeros."""
    gh, gw = grid
    token = torch.arange(gh * gw, device=like.device)
    return torch.cat((F.one_hot(token // gw, gh), F.one_hot(token % gw, gw),
                      token.new_zeros(gh * gw, padding)), dim=-1).to(like.dtype)


def augmented_attention(q, k, v, scale: float, by_row, by_col, grid: Tuple[int, int]) -> torch.Tensor:
    """softmax(q' k'^T) v with the bias inside q' k'^T (see ATTENTION_PATHS): (B, heads, L, d)."""
    head_dim = q.shape[-1]
    width = head_dim + by_row.shape[-1] + by_col.shape[-1]
    padding = -width % AUGMENTED_WIDTH_MULTIPLE
    q_aug = torch.cat((q * scale, by_row, by_col, q.new_zeros(*q.shape[:-1], padding)), dim=-1)
    key_position = key_position_one_hot(grid, padding, k)
    k_aug = torch.cat((k, key_position.expand(*k.shape[:-1], -1)), dim=-1)  # (B, heads, L, width)
    if q.device.type == 'cpu':
        # The CPU flash kernel wants v as wide as q' and k'; without it only the math kernel is
        # left, which builds the L x L logits. CUDA's memory-efficient kernel takes v as it is.
        v = F.pad(v, (0, q_aug.shape[-1] - head_dim))
    out = F.scaled_dot_product_attention(q_aug, k_aug, v, scale=1.0)
    return out[..., :head_dim]


def flex_rel_pos_attention(q, k, v, by_row, by_col, grid: Tuple[int, int]) -> torch.Tensor:
    """FlexAttention adding each score's two bias terms (see ATTENTION_PATHS): (B, heads, L, d)."""
    grid_w = grid[1]

    def add_rel_pos(score, b, h, q_idx, kv_idx):
        return score + by_row[b, h, q_idx, kv_idx // grid_w] + by_col[b, h, q_idx, kv_idx % grid_w]

    return compiled_flex_attention()(q, k, v, score_mod=add_rel_pos)


def timm_attention(q, k, v, scale: float, rel_pos_h, rel_pos_w, grid: Tuple[int, int],
                   fused: bool) -> torch.Tensor:
    """timm's vision_transformer_sam.Attention, its layout included: (B, heads, L, d)."""
    batch_heads_shape = q.shape
    q, k, v = (t.flatten(0, 1) for t in (q, k, v))  # (B*heads, L, d)
    bias = get_decomposed_rel_pos_bias(q, rel_pos_h, rel_pos_w, grid, grid)  # (B*heads, L, L)
    if fused:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    else:
        out = ((q * scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1) @ v
    return out.view(batch_heads_shape)


class RelPosAttention(nn.Module):
    """Global attention with decomposed relative-position bias, on the path MVG.set_attention picks.

    It takes over the projections and tables of the timm Attention that timm's Block built, so the
    state-dict keys and the seeded initial values stay timm's. MVG uses neither attention dropout
    nor q/k norms, so those are not carried over.
    """

    def __init__(self, built: Attention):
        super().__init__()
        self.num_heads = built.num_heads
        self.head_dim = built.head_dim
        self.scale = built.scale
        self.rel_pos_h = built.rel_pos_h
        self.rel_pos_w = built.rel_pos_w
        self.qkv = built.qkv
        self.proj = built.proj
        self.path = 'auto'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, gh, gw, _ = x.shape  # (B, Hp, Wp, D): the token grid, or windows of it
        grid = (gh, gw)
        qkv = self.qkv(x.reshape(batch, gh * gw, -1)).view(batch, gh * gw, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, heads, L, d)
        path = self.path
        if path == 'auto':
            path = choose_attention(x.device.type, compute_dtype(x), torch.is_grad_enabled())
        if path in ('fused', 'eager'):
            out = timm_attention(q, k, v, self.scale, self.rel_pos_h, self.rel_pos_w, grid, path == 'fused')
        else:
            by_row, by_col = rel_pos_logit_terms(q, self.rel_pos_h, self.rel_pos_w, grid)
            if path == 'augmented':
                out = augmented_attention(q, k, v, self.scale, by_row, by_col, grid)
            else:
                out = flex_rel_pos_attention(q, k, v, by_row, by_col, grid)
        out = out.transpose(1, 2).reshape(batch, gh, gw, -1)  # (B, Hp, Wp, heads*d)
        return self.proj(out)


def default_out_indices(depth: int) -> Tuple[int, ...]:
    """The last block of each quarter of the depth: (5, 11, 17, 23) at depth 24."""
    if depth < 4:
        raise ValueError(f"depth must be at least 4 to take four feature levels, got {depth}")
    return tuple(depth * (q + 1) // 4 - 1 for q in range(4))


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
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
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
        out_indices: Optional[Sequence[int]] = None,
        merge_idx=2,
        loss_beta=0.01,
        min_visible_target=0.0,
    ):
        super().__init__()
        img_size = tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size, img_size)
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(f"img_size {img_size} must be divisible by patch_size {patch_size}")
        if (img_size[0] // patch_size) % 2:
            raise ValueError(f"img_size height {img_size[0]} must hold an even number of patch rows "
                             "(context pair on top, query pair below)")
        out_indices = tuple(default_out_indices(depth) if out_indices is None else out_indices)
        if len(out_indices) != 4:
            raise ValueError(f"out_indices must name 4 blocks (the decoder takes 4 levels), got {out_indices}")
        if not 0 <= merge_idx < depth:
            raise ValueError(f"merge_idx {merge_idx} must be a block index in [0, {depth})")
        if any(not 0 <= i < depth for i in out_indices):
            raise ValueError(f"out_indices {out_indices} must be block indices in [0, {depth})")

        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.embed_dim = embed_dim
        self.decoder_embed_dim = decoder_embed_dim
        self.out_indices = out_indices
        self.merge_idx = merge_idx
        self.pretrain_use_cls_token = pretrain_use_cls_token
        self.use_act_checkpoint = use_act_checkpoint
        self.loss_beta = loss_beta
        self.min_visible_target = min_visible_target

        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            output_fmt='NHWC', strict_img_size=False,
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, embed_dim))
        self.segment_token_x = nn.Parameter(torch.zeros(1, 1, 1, embed_dim))
        self.segment_token_y = nn.Parameter(torch.zeros(1, 1, 1, embed_dim))
        if use_abs_pos:
            # Kept at the MAE pretraining size so MAE checkpoints load unchanged; resized every forward.
            num_positions = (pretrain_img_size // patch_size) ** 2 + int(pretrain_use_cls_token)
            self.pos_embed = nn.Parameter(torch.zeros(1, num_positions, embed_dim))
        else:
            self.pos_embed = None

        drop_path_rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList([
            Block(
                dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                drop_path=drop_path_rates[i], norm_layer=norm_layer, act_layer=act_layer,
                use_rel_pos=use_rel_pos, input_size=self.grid_size,
                window_size=window_size if i in window_block_indexes else 0,
            )
            for i in range(depth)
        ])
        if use_rel_pos:
            for blk in self.blocks:
                blk.attn = RelPosAttention(blk.attn)
        self.norm = norm_layer(embed_dim)

        self.decoder_embed = nn.Linear(4 * embed_dim, patch_size ** 2 * decoder_embed_dim)
        self.decoder_pred = nn.Sequential(
            nn.Conv2d(decoder_embed_dim, decoder_embed_dim, kernel_size=3, padding=1),
            LayerNorm2d(decoder_embed_dim, eps=1e-6),
            nn.GELU(),
            nn.Conv2d(decoder_embed_dim, in_chans, kernel_size=1),
        )
        self._init_weights(use_rel_pos and not rel_pos_zero_init)
        self.set_attention('auto')

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

    def set_attention(self, path: str = 'auto'):
        """How attention adds the rel-pos bias: one of ATTENTION_PATHS (all compute the same thing)."""
        if path not in ATTENTION_PATHS:
            raise ValueError(f"attention path must be one of {', '.join(ATTENTION_PATHS)}, got '{path}'")
        self.attention = path
        for blk in self.blocks:
            if isinstance(blk.attn, RelPosAttention):
                blk.attn.path = path
            else:  # timm's Attention of a model without rel-pos: no bias, only plain SDPA or eager
                blk.attn.fused_attn = path != 'eager'

    def set_fused_attn(self, enabled: bool = True):
        """timm's two paths: 'fused' (SDPA with the bias as mask) or 'eager' (written out)."""
        self.set_attention('fused' if enabled else 'eager')

    def set_grad_checkpointing(self, enable: bool = True):
        self.use_act_checkpoint = enable

    @torch.jit.ignore
    def no_weight_decay(self):
        return {'pos_embed', 'mask_token', 'segment_token_x', 'segment_token_y'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        """Layer groups for layer-wise lr decay, as MAE/BEiT assign them: the patch and position
        embeddings lowest, one group per block, and a top group above the last block (full learning
        rate) for everything new in MVG: the final norm, the decoder, the mask and segment tokens."""
        return dict(
            stem=r'^pos_embed|^patch_embed',
            blocks=[(r'^blocks\.(\d+)', None), (r'^norm|^decoder|^mask_token|^segment_token', (99998,))],
        )

    # ----------------------------------------------------------------------------------------------
    # tensor layout helpers

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C), tokens in raster order, pixels (row, col, channel)."""
        n, c, h, w = imgs.shape
        p = self.patch_size
        x = imgs.reshape(n, c, h // p, p, w // p, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor, grid_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """(N, L, p*p*C) -> (N, C, H, W); grid_size (H/p, W/p) defaults to the model's canvas."""
        gh, gw = grid_size or self.grid_size
        n, length, dim = x.shape
        p = self.patch_size
        if length != gh * gw or dim % (p * p):
            raise ValueError(f"cannot unpatchify {tuple(x.shape)} onto a {gh}x{gw} grid of {p}x{p} patches")
        c = dim // (p * p)
        x = x.reshape(n, gh, gw, p, p, c)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(n, c, gh * p, gw * p)

    def abs_pos_embed(self, grid_size: Tuple[int, int]) -> torch.Tensor:
        """The pretraining position embedding resized to the token grid: (1, Hp, Wp, D)."""
        pos = self.pos_embed[:, 1:] if self.pretrain_use_cls_token else self.pos_embed
        side = int(round(pos.shape[1] ** 0.5))
        pos = pos.reshape(1, side, side, -1)
        return resample_abs_pos_embed_nhwc(pos, list(grid_size), interpolation='bicubic', antialias=False)

    def ar_mask(self, batch_size: int, grid_size: Optional[Tuple[int, int]] = None,
                device=None) -> torch.Tensor:
        """Every query-target token (bottom half) masked: (N, Hp*Wp) bool."""
        gh, gw = grid_size or self.grid_size
        mask = torch.zeros(gh, gw, dtype=torch.bool, device=device)
        mask[gh // 2:] = True
        return mask.flatten().expand(batch_size, -1)

    def _check_inputs(self, imgs, tgts, bool_masked_pos):
        if imgs.shape != tgts.shape:
            raise ValueError(f"imgs {tuple(imgs.shape)} and tgts {tuple(tgts.shape)} must have the same shape")
        if imgs.ndim != 4 or imgs.shape[2] % self.patch_size or imgs.shape[3] % self.patch_size:
            raise ValueError(f"expected canvases (N, C, H, W) with H and W divisible by {self.patch_size}, "
                             f"got {tuple(imgs.shape)}")
        n, _, h, w = imgs.shape
        num_tokens = (h // self.patch_size) * (w // self.patch_size)
        if bool_masked_pos is None:
            return torch.zeros(n, num_tokens, dtype=torch.bool, device=imgs.device)
        mask = bool_masked_pos.flatten(1).to(device=imgs.device, dtype=torch.bool)
        if mask.shape != (n, num_tokens):
            raise ValueError(f"bool_masked_pos {tuple(bool_masked_pos.shape)} does not cover the "
                             f"{h // self.patch_size}x{w // self.patch_size} token grid of {n} canvases")
        return mask

    # ----------------------------------------------------------------------------------------------
    # the model

    def _run_block(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.use_act_checkpoint and torch.is_grad_enabled():
            # Non-reentrant checkpointing replays the saved RNG state, so drop path matches.
            return checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def forward_encoder(self, imgs: torch.Tensor, tgts: torch.Tensor,
                        bool_masked_pos: torch.Tensor, num_prompts: int = 1) -> list:
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
        n, gh, gw, _ = x.shape
        p, cd = self.patch_size, self.decoder_embed_dim
        x = x.reshape(n, gh, gw, p, p, cd).permute(0, 5, 1, 3, 2, 4).reshape(n, cd, gh * p, gw * p)
        return self.decoder_pred(x)  # (N, 3, H, W)

    def pixel_mask(self, bool_masked_pos: torch.Tensor, grid_size: Tuple[int, int]) -> torch.Tensor:
        """Token mask (N, L) -> pixel mask (N, 1, H, W) as float."""
        n = bool_masked_pos.shape[0]
        mask = bool_masked_pos.reshape(n, 1, *grid_size).float()
        return mask.repeat_interleave(self.patch_size, 2).repeat_interleave(self.patch_size, 3)

    def loss_weights(self, tgts: torch.Tensor, bool_masked_pos: torch.Tensor,
                     valid: Optional[torch.Tensor] = None) -> torch.Tensor:
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

    def forward_loss(self, pred: torch.Tensor, tgts: torch.Tensor, bool_masked_pos: torch.Tensor,
                     valid: Optional[torch.Tensor] = None, per_sample: bool = False,
                     divisor: Optional[torch.Tensor] = None):
        """Smooth-L1 over hidden pixels, weighted by loss_weights, summed and divided by `divisor`.

        By default the divisor is this batch's own weight (+ LOSS_WEIGHT_EPS): the weighted mean over
        the batch. Training passes the weight of its whole global batch instead, so that however that
        batch is split into micro-batches and ranks, their gradients add up to those of its mean.

        With per_sample, also each sample's own weighted mean (N,), detached, NaN for a sample without
        weight, from the same sums (per-task logging then costs nothing extra).
        """
        weight = self.loss_weights(tgts, bool_masked_pos, valid)
        loss = F.smooth_l1_loss(pred.float(), tgts.float(), reduction='none', beta=self.loss_beta)
        sample_sums = (loss * weight).sum(dim=(1, 2, 3))  # (N,)
        sample_weights = weight.sum(dim=(1, 2, 3))
        if divisor is None:
            divisor = sample_weights.sum() + LOSS_WEIGHT_EPS
        total = sample_sums.sum() / divisor
        if not per_sample:
            return total
        with torch.no_grad():
            own = sample_sums / (sample_weights + LOSS_WEIGHT_EPS)
            own = torch.where(sample_weights > 0, own, torch.full_like(own, float('nan')))
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

    def forward(self, imgs: torch.Tensor, tgts: torch.Tensor, bool_masked_pos: Optional[torch.Tensor] = None,
                valid: Optional[torch.Tensor] = None, return_per_sample: bool = False,
                loss_divisor: Optional[torch.Tensor] = None):
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
    def predict(self, imgs: torch.Tensor, tgts: torch.Tensor, bool_masked_pos: Optional[torch.Tensor] = None,
                num_prompts: int = 1, ensemble: str = 'features') -> torch.Tensor:
        """Inference: the predicted target canvas in normalised units, (N / num_prompts, 3, H, W).

        By default the whole query target (bottom half) is masked, so `tgts` only needs the context
        target on top; the bottom half of the output is the prediction for the query image.
        Several prompts per query (batch ordered query-major, K = num_prompts canvases per query):
        ensemble 'features' averages the query-half features across prompts after the merge,
        'outputs' averages the K predictions, 'both' does both. The top half of an ensembled output
        mixes different contexts and carries no meaning.
        """
        if ensemble not in ('features', 'outputs', 'both'):
            raise ValueError(f"ensemble must be 'features', 'outputs' or 'both', got '{ensemble}'")
        n, _, h, w = imgs.shape
        if num_prompts < 1 or n % num_prompts:
            raise ValueError(f"a batch of {n} canvases does not split into groups of num_prompts={num_prompts}")
        if bool_masked_pos is None:
            grid = (h // self.patch_size, w // self.patch_size)
            bool_masked_pos = self.ar_mask(n, grid, device=imgs.device)
        mask = self._check_inputs(imgs, tgts, bool_masked_pos)
        share = num_prompts if ensemble in ('features', 'both') else 1
        pred = self.forward_decoder(self.forward_encoder(imgs, tgts, mask, num_prompts=share))
        return pred.view(n // num_prompts, num_prompts, *pred.shape[1:]).mean(dim=1)


def _mvg(input_size, **kwargs) -> MVG:
    return MVG(img_size=tuple(input_size), **kwargs)


def mvg_vit_large_patch16(input_size=(896, 448), **kwargs) -> MVG:
    """The paper's model: ViT-L/16, 370,721,155 parameters at 896x448."""
    defaults = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4, qkv_bias=True,
                    drop_path_rate=0.1, decoder_embed_dim=64)
    return _mvg(input_size, **{**defaults, **kwargs})


def mvg_vit_base_patch16(input_size=(896, 448), **kwargs) -> MVG:
    defaults = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4, qkv_bias=True,
                    drop_path_rate=0.1, decoder_embed_dim=64)
    return _mvg(input_size, **{**defaults, **kwargs})


def mvg_vit_small_patch16(input_size=(896, 448), **kwargs) -> MVG:
    defaults = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4, qkv_bias=True,
                    drop_path_rate=0.05, decoder_embed_dim=32)
    return _mvg(input_size, **{**defaults, **kwargs})


def mvg_vit_tiny_patch16(input_size=(896, 448), **kwargs) -> MVG:
    """For CPU demos and tests: ViT-Ti/16 with a slimmer pixel decoder."""
    defaults = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4, qkv_bias=True,
                    drop_path_rate=0.0, decoder_embed_dim=16)
    return _mvg(input_size, **{**defaults, **kwargs})


MODELS = {fn.__name__: fn for fn in (
    mvg_vit_large_patch16, mvg_vit_base_patch16, mvg_vit_small_patch16, mvg_vit_tiny_patch16)}


def create_model(name: str, **kwargs) -> MVG:
    """Builds a model by factory name, with a clear error for an unknown one."""
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; choose one of {', '.join(MODELS)}")
    return MODELS[name](**kwargs)
