"""A diffusion transformer over spacetime latent patches (DiT with adaLN-Zero, 3D rotary positions, caption
cross-attention), readable top to bottom like facebookresearch/DiT's models.py. Size presets are at the bottom.

Shapes: latents x (B, C, T, H, W) are cut into (pt, ph, pw) patches -> tokens (B, N, D); any T/H/W works (the
latent is zero-padded up to a multiple of the patch size and the output cropped back). Captions arrive as token
embeddings (B, L, D_text) with a mask (B, L); a learned register token is always attended, so an all-masked
caption (dropped for classifier-free guidance, or empty) is the unconditional input.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, N, D) shifted and scaled per sample (shift (B, D)) or per frame group (shift (B, G, D): the N tokens
    are G equal runs, one per latent frame group, as `patchify` orders them)."""
    if shift.dim() == 2:
        return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
    b, n, d = x.shape
    g = shift.shape[1]
    return (x.view(b, g, n // g, d) * (1 + scale.unsqueeze(2)) + shift.unsqueeze(2)).view(b, n, d)


def gated(gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y (B, N, D) times a gate per sample (B, D) or per frame group (B, G, D), like `modulate`."""
    if gate.dim() == 2:
        return gate.unsqueeze(1) * y
    b, n, d = y.shape
    g = gate.shape[1]
    return (gate.unsqueeze(2) * y.view(b, g, n // g, d)).view(b, n, d)


# ---------------------------------------------------------------------------------------------
# patches


def pad_to_patch(x: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """Zero-pad (B, C, T, H, W) on the end of T, H and W up to multiples of the patch size."""
    t, h, w = x.shape[-3:]
    pt, ph, pw = patch
    pad = ((-w) % pw, (-h) % ph, (-t) % pt)
    if not any(pad):
        return x
    return F.pad(x, (0, pad[0], 0, pad[1], 0, pad[2]))


def patchify(x: torch.Tensor, patch: tuple[int, int, int]) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(B, C, T, H, W) with T, H, W multiples of the patch -> tokens (B, N, C*pt*ph*pw) and the grid (t, h, w).

    Tokens run over t, then h, then w; each token's features are (C, pt, ph, pw) flattened.
    """
    b, c, t, h, w = x.shape
    pt, ph, pw = patch
    grid = (t // pt, h // ph, w // pw)
    x = x.reshape(b, c, grid[0], pt, grid[1], ph, grid[2], pw)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # (B, t, h, w, C, pt, ph, pw)
    return x.reshape(b, grid[0] * grid[1] * grid[2], c * pt * ph * pw), grid


def unpatchify(
    tokens: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int], channels: int
) -> torch.Tensor:
    """The inverse of `patchify`: (B, N, C*pt*ph*pw) -> (B, C, t*pt, h*ph, w*pw)."""
    b = tokens.shape[0]
    pt, ph, pw = patch
    x = tokens.reshape(b, *grid, channels, pt, ph, pw)
    x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)  # (B, C, t, pt, h, ph, w, pw)
    return x.reshape(b, channels, grid[0] * pt, grid[1] * ph, grid[2] * pw)


# ---------------------------------------------------------------------------------------------
# positions: 3D rotary embeddings, one band of frequencies per axis


def rope_3d(
    grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (N, head_dim // 2) for the tokens of a (t, h, w) grid in patchify order.

    The head_dim/2 rotation pairs are split between the axes (h and w a third each, t the rest), so attention
    sees relative offsets in time and space separately, for any grid size.
    """
    pairs = head_dim // 2
    hw_pairs = pairs // 3
    axis_pairs = (pairs - 2 * hw_pairs, hw_pairs, hw_pairs)
    coords = torch.meshgrid(*(torch.arange(n, device=device, dtype=torch.float32) for n in grid), indexing="ij")
    angles = []
    for coord, n in zip(coords, axis_pairs, strict=True):
        freqs = 1.0 / theta ** (torch.arange(n, device=device, dtype=torch.float32) / max(n, 1))
        angles.append(coord.reshape(-1, 1) * freqs)
    angle = torch.cat(angles, dim=1)
    return angle.cos(), angle.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, N, head_dim) by per-token angles; pairs are (i, i + head_dim/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


# ---------------------------------------------------------------------------------------------
# embedders


class TimestepEmbedder(nn.Module):
    """Scalar noise level t in [0, 1] -> vector, through sinusoidal features and an MLP (as in DiT)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = (t.float() * 1000.0)[:, None] * freqs[None]  # t in [0, 1]: DiT's embedding expects 0..1000
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class CaptionEmbedder(nn.Module):
    """Caption token embeddings (B, L, D_text) -> context tokens (B, 1 + L, D) with a learned register token first,
    plus a pooled vector (masked mean) that joins the timestep in the adaLN conditioning."""

    def __init__(self, text_dim: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(text_dim, hidden_size), nn.GELU(approximate="tanh"))
        self.register = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.pooled = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, text: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = self.proj(text)
        b = tokens.shape[0]
        context = torch.cat([self.register.expand(b, -1, -1).to(tokens.dtype), tokens], dim=1)
        mask = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=mask.device), mask.bool()], dim=1)
        weights = mask.to(tokens.dtype).unsqueeze(-1)
        pooled = (context * weights).sum(1) / weights.sum(1)
        return context, mask, self.pooled(pooled)


# ---------------------------------------------------------------------------------------------
# transformer


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        # QK-norm keeps attention logits bounded, which bf16 training at scale needs (ViT-22B, SD3).
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(self.q_norm(q), cos, sin), apply_rotary(self.k_norm(k), cos, sin)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class CrossAttention(nn.Module):
    """Video tokens attend to the caption context (no positions: a caption is a set of token features)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q = self.q(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(context).reshape(b, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v, attn_mask=mask[:, None, None, :])
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Self-attention and MLP modulated by the conditioning (adaLN-Zero: gates start at 0, so each block starts as
    the identity), with caption cross-attention between them (as in PixArt-alpha)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.cross_attn = CrossAttention(hidden_size, num_heads, qk_norm)
        self.norm3 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gated(gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa), cos, sin))
        x = x + self.cross_attn(self.norm2(x), context, context_mask)
        x = x + gated(gate_mlp, self.mlp(modulate(self.norm3(x), shift_mlp, scale_mlp)))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


@dataclass(frozen=True)
class DiTArgs:
    """Everything needed to rebuild the model; stored in every checkpoint."""

    in_channels: int
    text_dim: int
    hidden_size: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    patch_size: tuple[int, int, int] = (1, 2, 2)
    qk_norm: bool = True
    rope_theta: float = 10000.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DiTArgs:
        return cls(**{**d, "patch_size": tuple(d["patch_size"])})


class DiT(nn.Module):
    """Denoiser v = f(x_t, t, caption) over latents (B, C, T, H, W); returns the same shape."""

    def __init__(self, args: DiTArgs):
        super().__init__()
        if args.hidden_size % args.num_heads:
            raise ValueError(f"hidden_size {args.hidden_size} is not divisible by num_heads {args.num_heads}")
        if (args.hidden_size // args.num_heads) % 2:
            raise ValueError(f"head dim {args.hidden_size // args.num_heads} must be even for rotary positions")
        self.args = args
        self.patch_size = tuple(args.patch_size)
        patch_dim = args.in_channels * math.prod(self.patch_size)
        self.x_embedder = nn.Linear(patch_dim, args.hidden_size)
        self.t_embedder = TimestepEmbedder(args.hidden_size)
        self.y_embedder = CaptionEmbedder(args.text_dim, args.hidden_size)
        self.blocks = nn.ModuleList(
            DiTBlock(args.hidden_size, args.num_heads, args.mlp_ratio, args.qk_norm) for _ in range(args.depth)
        )
        self.final_layer = FinalLayer(args.hidden_size, patch_dim)
        self.activation_checkpointing = False
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.y_embedder.register, std=0.02)
        # adaLN-Zero: every block and the output start at zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        frame_t: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """v for x_t (B, C, T, H, W) at noise levels t (B,); `frame_t` (B, T), when given, sets a noise level per
        latent frame instead (frames given as conditioning sit at 0 or a small level, as in LTX-Video)."""
        size = x.shape[-3:]
        tokens, grid = patchify(pad_to_patch(x, self.patch_size), self.patch_size)
        h = self.x_embedder(tokens)
        context, context_mask, pooled = self.y_embedder(text, text_mask)
        if frame_t is None:
            c = self.t_embedder(t) + pooled
        else:
            # One conditioning vector per temporal token group; a group spanning several frames (pt > 1) takes the
            # noisiest of them, so it counts as given only when all its frames are.
            b, pt = x.shape[0], self.patch_size[0]
            levels = F.pad(frame_t.float(), (0, (-frame_t.shape[1]) % pt)).view(b, grid[0], pt).amax(-1)
            c = self.t_embedder(levels.reshape(-1)).view(b, grid[0], -1) + pooled.unsqueeze(1)
        cos, sin = rope_3d(grid, self.args.hidden_size // self.args.num_heads, self.args.rope_theta, x.device)
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                h = checkpoint(block, h, c, context, context_mask, cos, sin, use_reentrant=False)
            else:
                h = block(h, c, context, context_mask, cos, sin)
        out = unpatchify(self.final_layer(h, c), grid, self.patch_size, self.args.in_channels)
        if tuple(out.shape[-3:]) != tuple(size):  # crop the padding; a copy, not a view (FSDP hooks need that)
            out = out[..., : size[0], : size[1], : size[2]].contiguous()
        return out

    def flops_per_sample(self, num_tokens: int, context_len: int) -> float:
        """Training FLOPs (forward + backward = 3x forward) of one sample with `num_tokens` video tokens and
        `context_len` caption tokens, counted term by term: what runs per video token (qkv, projections, MLP,
        attention scores), per caption token (its projection, cross-attention K/V) and once per sample (the
        timestep and pooled embedders, every adaLN modulation). Matches torch's FlopCounterMode."""
        a = self.args
        d, n, depth = a.hidden_size, num_tokens, a.depth
        ctx = context_len + 1  # the register token leads the caption context
        mlp = int(d * a.mlp_ratio)
        patch_dim = self.x_embedder.in_features
        freq = self.t_embedder.frequency_embedding_size
        per_block = (
            2 * n * d * (3 * d + d + d + d + 2 * mlp)  # qkv, self-attn out, cross q, cross out, MLP
            + 2 * ctx * d * 2 * d  # cross-attention K/V over the caption context
            + 4 * n * n * d  # self-attention: scores and weighted sum
            + 4 * n * ctx * d  # cross-attention: scores and weighted sum
            + 2 * d * 6 * d  # adaLN modulation: once per sample
        )
        once = 2 * (freq * d + d * d) + 2 * d * d + 2 * d * 2 * d  # timestep MLP, pooled caption, final adaLN
        forward = (
            depth * per_block
            + once
            + 2 * n * patch_dim * d * 2  # patch embedding and the final linear layer
            + 2 * context_len * a.text_dim * d  # caption projection
        )
        return 3.0 * forward


# ---------------------------------------------------------------------------------------------
# size presets (DiT's S/B/L/XL widths and depths; "1B" is about 1.0B parameters with a 4096-wide text encoder)

PRESETS: dict[str, dict] = {
    "tiny": {"hidden_size": 64, "depth": 2, "num_heads": 4, "patch_size": (1, 2, 2)},
    "S": {"hidden_size": 384, "depth": 12, "num_heads": 6, "patch_size": (1, 2, 2)},
    "B": {"hidden_size": 768, "depth": 12, "num_heads": 12, "patch_size": (1, 2, 2)},
    "L": {"hidden_size": 1024, "depth": 24, "num_heads": 16, "patch_size": (1, 2, 2)},
    "XL": {"hidden_size": 1152, "depth": 28, "num_heads": 16, "patch_size": (1, 2, 2)},
    "1B": {"hidden_size": 1536, "depth": 20, "num_heads": 24, "patch_size": (1, 2, 2)},
}


def build_model(preset: str, in_channels: int, text_dim: int, **overrides) -> DiT:
    """A DiT of a named size; `overrides` (hidden_size, depth, num_heads, mlp_ratio, patch_size, qk_norm) win."""
    if preset not in PRESETS:
        raise ValueError(f"model.preset: {preset!r} is not a preset; choose one of {', '.join(PRESETS)}")
    settings = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    settings["patch_size"] = tuple(settings["patch_size"])
    return DiT(DiTArgs(in_channels=in_channels, text_dim=text_dim, **settings))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
