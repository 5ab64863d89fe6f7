"""Global attention with decomposed relative-position bias, and the exact ways to compute it.

Every block of MVG attends globally over its L = Hp*Wp tokens (1568 at 896x448; the image and target
streams are separate batch elements, not one sequence). Query i's logit for key j is
    scale * q_i.k_j + q_i.Rh[row(i), row(j)] + q_i.Rw[col(i), col(j)]
with the unscaled query in the bias terms (timm's get_decomposed_rel_pos_bias, from MViTv2). The
paths (ATTENTION_PATHS) differ only in how those bias terms reach the softmax:
  fused      timm's: the dense (B*heads, L, L) bias as additive mask of scaled_dot_product_attention
             on 3-D (B*heads, L, d) tensors. No fused CUDA kernel takes 3-D inputs, so on CUDA
             this is the math kernel; the CPU flash kernel takes no mask that needs a gradient,
             so CPU training runs the math kernel too, CPU inference the flash kernel.
  eager      timm's: softmax(q k^T * scale + bias) v written out, the reference.
  augmented  the bias folded into the dot product: q' = [q * scale, q.Rh per key row, q.Rw per key
             column], k' = [k, one-hot of the key's row, one-hot of its column], attention with
             scale 1 and no mask. Nothing of size L x L is built outside the kernel.
  flex       FlexAttention (compiled) adding q.Rh and q.Rw per score in a score_mod; PyTorch has
             no FlexAttention backward on the CPU.
  auto       chosen per call by choose_attention from the device, dtype, grad mode and token count.

RelPosAttention takes over the weights of the timm Attention a SAM-ViT Block builds, so the
state-dict keys stay timm's (and the authors').
"""

from functools import cache

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer_sam import Attention, get_decomposed_rel_pos_bias, get_rel_pos
from torch.nn.attention.flex_attention import flex_attention

ATTENTION_PATHS = ("auto", "fused", "eager", "augmented", "flex")

# The fused CUDA kernels need head widths in multiples of 8 (16-bit) or 4 (fp32); the zero padding of
# q' and k' adds nothing to the logits.
AUGMENTED_WIDTH_MULTIPLE = 8


# Below this many tokens per stream, attention is a small share of a CPU fp32 training step, and the
# 2.4x wider value matmuls of 'augmented' cost more than the dense bias it saves (ViT-L at 448x224,
# 392 tokens: eager 45.3 s, augmented 48.3 s; the tiny model at 896x448, 1568 tokens: augmented
# 5.39 s, eager 5.76 s and 23% less memory; bench/README.md, "Attention paths").
AUGMENTED_MIN_TOKENS = 1024


def choose_attention(device_type: str, dtype: torch.dtype, needs_grad: bool, tokens: int) -> str:
    """The path 'auto' takes for attention over `tokens` tokens per stream. Seconds per training step /
    forward, 2 shared CPU cores, paths run in turns (bench/README.md, "Attention paths"):

        device  dtype       training                  no gradients  measured
        CPU     fp32        augmented from 1024       fused         tiny 896x448 (1568 tokens):
                            tokens, eager below                     augmented 5.39 / 1.66, fused
                                                                    5.76 / 1.55, eager 5.76 / 2.36;
                                                                    ViT-L 448x224 (392): eager 45.3
                                                                    / 15.3, fused 46.7 / 14.5,
                                                                    augmented 48.3 / 16.7
        CPU     16-bit      eager                     eager         bf16: eager 2.57 / 0.95,
                                                                    augmented 3.98 / 1.31, fused
                                                                    4.54 / 1.16 (fp16 not measured)
        CUDA    any         augmented                 augmented     H200, ViT-L 896x448 batch 8
                                                                    bf16: augmented 0.241 / 0.078,
                                                                    eager 0.429 / 0.187, fused
                                                                    0.598 / 0.280, flex 0.706 /
                                                                    0.371 (augmented 25 GiB,
                                                                    eager 69, fused 55, flex 22)
        other   any         fused                     fused         timm's default, not measured

    On CUDA 'augmented' hands attention to a flash kernel with nothing of size L x L outside it;
    timm's 'fused' gives SDPA a dense bias (and its gradient) per block, which rules the flash kernel
    out.
    """
    if device_type == "cuda":
        return "augmented"
    if device_type != "cpu":
        return "fused"
    if dtype in (torch.bfloat16, torch.float16):
        return "eager"
    if not needs_grad:
        return "fused"
    return "augmented" if tokens >= AUGMENTED_MIN_TOKENS else "eager"


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the attention computes in: autocast's where it is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


@cache
def compiled_flex_attention():
    """flex_attention is fast only compiled; one compiled function serves every block and shape."""
    return torch.compile(flex_attention, dynamic=False)


def rel_pos_logit_terms(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, grid: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's bias terms per key row and per key column, from the unscaled query:
    (B, heads, L, Hp) and (B, heads, L, Wp). The dense bias would be their sum over all (row, col)."""
    gh, gw = grid
    table_h = get_rel_pos(gh, gh, rel_pos_h)  # (Hp query rows, Hp key rows, d), resized if need be
    table_w = get_rel_pos(gw, gw, rel_pos_w)  # (Wp query cols, Wp key cols, d)
    q_grid = q.unflatten(2, (gh, gw))  # (B, heads, Hp, Wp, d)
    by_row = torch.einsum("bnhwc,hkc->bnhwk", q_grid, table_h).flatten(2, 3)
    by_col = torch.einsum("bnhwc,wkc->bnhwk", q_grid, table_w).flatten(2, 3)
    return by_row.to(q.dtype), by_col.to(q.dtype)


def key_position_one_hot(grid: tuple[int, int], padding: int, like: torch.Tensor) -> torch.Tensor:
    """(L, Hp + Wp + padding): each key's row and column as one-hot codes, then zeros."""
    gh, gw = grid
    token = torch.arange(gh * gw, device=like.device)
    return torch.cat(
        (F.one_hot(token // gw, gh), F.one_hot(token % gw, gw), token.new_zeros(gh * gw, padding)), dim=-1
    ).to(like.dtype)


def augmented_attention(q, k, v, scale: float, by_row, by_col, grid: tuple[int, int]) -> torch.Tensor:
    """softmax(q' k'^T) v with the bias inside q' k'^T (see ATTENTION_PATHS): (B, heads, L, d)."""
    head_dim = q.shape[-1]
    width = head_dim + by_row.shape[-1] + by_col.shape[-1]
    padding = -width % AUGMENTED_WIDTH_MULTIPLE
    q_aug = torch.cat((q * scale, by_row, by_col, q.new_zeros(*q.shape[:-1], padding)), dim=-1)
    key_position = key_position_one_hot(grid, padding, k)
    k_aug = torch.cat((k, key_position.expand(*k.shape[:-1], -1)), dim=-1)  # (B, heads, L, width)
    if q.device.type == "cpu":
        # The CPU flash kernel wants v as wide as q' and k'; without it only the math kernel is
        # left, which builds the L x L logits. CUDA's memory-efficient kernel takes v as it is.
        v = F.pad(v, (0, q_aug.shape[-1] - head_dim))
    out = F.scaled_dot_product_attention(q_aug, k_aug, v, scale=1.0)
    return out[..., :head_dim]


def flex_rel_pos_attention(q, k, v, by_row, by_col, grid: tuple[int, int]) -> torch.Tensor:
    """FlexAttention adding each score's two bias terms (see ATTENTION_PATHS): (B, heads, L, d)."""
    grid_w = grid[1]

    def add_rel_pos(score, b, h, q_idx, kv_idx):
        return score + by_row[b, h, q_idx, kv_idx // grid_w] + by_col[b, h, q_idx, kv_idx % grid_w]

    return compiled_flex_attention()(q, k, v, score_mod=add_rel_pos)


def timm_attention(q, k, v, scale: float, rel_pos_h, rel_pos_w, grid: tuple[int, int], fused: bool) -> torch.Tensor:
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
        self.path = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, gh, gw, _ = x.shape  # (B, Hp, Wp, D): the token grid, or windows of it
        grid = (gh, gw)
        qkv = self.qkv(x.reshape(batch, gh * gw, -1)).view(batch, gh * gw, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, heads, L, d)
        path = self.path
        if path == "auto":
            path = choose_attention(x.device.type, compute_dtype(x), torch.is_grad_enabled(), gh * gw)
        if path in ("fused", "eager"):
            out = timm_attention(q, k, v, self.scale, self.rel_pos_h, self.rel_pos_w, grid, path == "fused")
        else:
            by_row, by_col = rel_pos_logit_terms(q, self.rel_pos_h, self.rel_pos_w, grid)
            if path == "augmented":
                out = augmented_attention(q, k, v, self.scale, by_row, by_col, grid)
            else:
                out = flex_rel_pos_attention(q, k, v, by_row, by_col, grid)
        out = out.transpose(1, 2).reshape(batch, gh, gw, -1)  # (B, Hp, Wp, heads*d)
        return self.proj(out)
