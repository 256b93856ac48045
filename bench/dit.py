"""A small Flux-shaped diffusion transformer for the quality benchmark, in pure torch.

Same module names as Flux checkpoints (``double_blocks.N.img_attn.qkv``, ``single_blocks.N.linear1``,
``*.mod.lin``…), so the engine's ``flux`` preset treats it like the real model: joint attention of
image and text tokens in double-stream blocks, fused attention + MLP in single-stream blocks,
adaLN modulation from a time + pooled-text vector. The weights are random (no trained DiT ships
on PyPI) but not isotropic: each Linear gets a decaying singular spectrum and the image embedder
a few high-gain channels, like the outlier channels of trained transformers. Inputs are
structured too: smooth latent fields noised at a random flow-matching time, prompts drawn from a
fixed token table.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

HIDDEN, HEADS, DOUBLE, SINGLE, MLP = 256, 4, 2, 4, 4
LATENT, CONTEXT, VOCAB, PROMPT = 16, 128, 512, 24


class Modulation(nn.Module):
    def __init__(self, chunks: int):
        super().__init__()
        self.lin = nn.Linear(HIDDEN, chunks * HIDDEN)
        self.chunks = chunks

    def forward(self, vec: torch.Tensor) -> list[torch.Tensor]:
        return self.lin(F.silu(vec))[:, None].chunk(self.chunks, dim=-1)


class Embedder(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.in_layer, self.out_layer = nn.Linear(width, HIDDEN), nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(HIDDEN, 3 * HIDDEN), nn.Linear(HIDDEN, HIDDEN)


class Stream(nn.Module):
    """One stream (image or text) of a double block: its own modulation, attention weights and MLP."""

    def __init__(self):
        super().__init__()
        self.mod, self.attn = Modulation(6), Attention()
        self.mlp = nn.Sequential(
            nn.Linear(HIDDEN, MLP * HIDDEN), nn.GELU(approximate="tanh"), nn.Linear(MLP * HIDDEN, HIDDEN)
        )


def _norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:])


def _attend(qkv: torch.Tensor) -> torch.Tensor:
    batch, tokens, _ = qkv.shape
    q, k, v = qkv.view(batch, tokens, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(_norm(q), _norm(k), v)
    return out.transpose(1, 2).reshape(batch, tokens, HIDDEN)


class DoubleBlock(nn.Module):
    def __init__(self):
        super().__init__()
        img, txt = Stream(), Stream()
        self.img_mod, self.img_attn, self.img_mlp = img.mod, img.attn, img.mlp
        self.txt_mod, self.txt_attn, self.txt_mlp = txt.mod, txt.attn, txt.mlp

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        im, tm = self.img_mod(vec), self.txt_mod(vec)
        img_qkv = self.img_attn.qkv(_norm(img) * (1 + im[1]) + im[0])
        txt_qkv = self.txt_attn.qkv(_norm(txt) * (1 + tm[1]) + tm[0])
        attended = _attend(torch.cat([txt_qkv, img_qkv], dim=1))
        txt_out, img_out = attended[:, : txt.shape[1]], attended[:, txt.shape[1] :]
        img = img + im[2] * self.img_attn.proj(img_out)
        img = img + im[5] * self.img_mlp(_norm(img) * (1 + im[4]) + im[3])
        txt = txt + tm[2] * self.txt_attn.proj(txt_out)
        txt = txt + tm[5] * self.txt_mlp(_norm(txt) * (1 + tm[4]) + tm[3])
        return img, txt


class SingleBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.modulation = Modulation(3)
        self.linear1 = nn.Linear(HIDDEN, 3 * HIDDEN + MLP * HIDDEN)
        self.linear2 = nn.Linear(HIDDEN + MLP * HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = self.linear1(_norm(x) * (1 + scale) + shift).split([3 * HIDDEN, MLP * HIDDEN], dim=-1)
        return x + gate * self.linear2(torch.cat([_attend(qkv), F.gelu(mlp, approximate="tanh")], dim=-1))


class FinalLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(HIDDEN, 2 * HIDDEN))
        self.linear = nn.Linear(HIDDEN, 4 * LATENT)

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None].chunk(2, dim=-1)
        return self.linear(_norm(x) * (1 + scale) + shift)


class FluxLike(nn.Module):
    """Predicts the flow-matching velocity of 2x2-patchified latents given a prompt and a time."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.img_in, self.txt_in = nn.Linear(4 * LATENT, HIDDEN), nn.Linear(CONTEXT, HIDDEN)
        self.time_in, self.vector_in = Embedder(256), Embedder(CONTEXT)
        self.double_blocks = nn.ModuleList(DoubleBlock() for _ in range(DOUBLE))
        self.single_blocks = nn.ModuleList(SingleBlock() for _ in range(SINGLE))
        self.final_layer = FinalLayer()
        _structure(self, torch.Generator().manual_seed(seed))

    def forward(self, img: torch.Tensor, txt: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        vec = self.time_in(_timestep_embedding(time)) + self.vector_in(txt.mean(dim=1))
        img, txt = self.img_in(img), self.txt_in(txt)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec)
        x = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            x = block(x, vec)
        return self.final_layer(x[:, txt.shape[1] :], vec)


def _timestep_embedding(time: torch.Tensor, width: int = 256) -> torch.Tensor:
    freqs = torch.exp(-math.log(10000) * torch.arange(width // 2) / (width // 2))
    angles = 1000 * time[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def _structure(model: nn.Module, generator: torch.Generator) -> None:
    """Decaying singular spectra for every Linear (``s_k ~ k^-0.5``), a few strong image channels."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                out, inp = module.weight.shape
                left = torch.linalg.qr(torch.randn(out, min(out, inp), generator=generator))[0]
                right = torch.linalg.qr(torch.randn(inp, min(out, inp), generator=generator))[0]
                spectrum = torch.arange(1, min(out, inp) + 1, dtype=torch.float32) ** -0.5
                weight = left @ torch.diag(spectrum) @ right.T
                module.weight.copy_(weight * (out**0.5) / float(spectrum.square().sum().sqrt()))
                module.bias.normal_(0, 0.02, generator=generator)
        model.img_in.weight[:4] *= 8  # outlier channels in the residual stream


class Prompts:
    """Random prompts over a fixed table of token embeddings (low-rank, like real text encoders')."""

    def __init__(self, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.table = torch.randn(VOCAB, 16, generator=generator) @ torch.randn(16, CONTEXT, generator=generator) / 4

    def batch(self, count: int, generator: torch.Generator) -> torch.Tensor:
        return self.table[torch.randint(VOCAB, (count, PROMPT), generator=generator)]


def latents(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth random fields (a few low spatial frequencies per channel), patchified 2x2: [count, tokens, 64]."""
    grid = torch.linspace(0, 2 * math.pi, size)
    y, x = torch.meshgrid(grid, grid, indexing="ij")
    field = torch.zeros(count, LATENT, size, size)
    for _ in range(4):
        fy, fx = torch.randint(1, 4, (2, count, LATENT, 1, 1), generator=generator)
        phase = torch.rand(count, LATENT, 1, 1, generator=generator) * 2 * math.pi
        field += torch.sin(fy * y + fx * x + phase) * torch.rand(count, LATENT, 1, 1, generator=generator)
    patches = field.unfold(2, 2, 2).unfold(3, 2, 2)  # [count, C, size/2, size/2, 2, 2]
    return patches.permute(0, 2, 3, 1, 4, 5).reshape(count, (size // 2) ** 2, 4 * LATENT)


def inputs(count: int, seed: int, prompts: Prompts, size: int = 32) -> list[tuple[torch.Tensor, ...]]:
    """Batches of (noisy latents at time t, prompt, t), as a sampler would feed the model."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        clean = latents(4, size, generator)
        time = torch.rand(4, generator=generator)
        noise = torch.randn(clean.shape, generator=generator)
        noisy = (1 - time[:, None, None]) * clean + time[:, None, None] * noise
        batches.append((noisy, prompts.batch(4, generator), time))
    return batches
