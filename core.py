"""The phase-1 model, top to bottom: register tokens and nested dropout, the losses, the design lines
(`DESIGNS`: flextok, fluxtalk, adapter) and leakage guards, `AlignmentModel` on frozen features, and the seed
package's API (`Aligner`, `AlignmentConfig`, `VisionTextAligner`, `set_seed`, `get_device`). Frozen encoders
are encoders.py's; the feature cache's `Features` is features.py's (both importable from here, as the seed
API and older code do)."""
from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from encoders import FrozenEncoder, MODALITIES, create_encoder
from features import Features
from images import image_batch

# ----------------------------------------------------------------------------------------------
# 1. Register tokens: one small class per idea (attention mask, attention, registers, nested dropout)

ATTENTIONS = ("joint", "cross")
DROPOUT_MODES = ("power_of_two", "uniform", "linear", "none")
LOSS_TYPES = ("contrastive", "flow_matching", "combined")


def doubling_grid(n: int) -> list[int]:
    """1, 2, 4, ... below n, then n itself: the prefix lengths k of every curve (phase 1 and phase 2) and the
    ones power_of_two nested dropout draws from."""
    return [1 << i for i in range(n.bit_length()) if 1 << i < n] + [n]


@dataclass
class ModelConfig:
    """The trainable part of phase 1. Defaults are the FlexTok-style design line of the SPEC."""
    design: str = "flextok"  # flextok: joint attention registers | fluxtalk: few cross-attn registers | adapter: MLP
    modalities: tuple[str, ...] = ("vision", "touch")
    hidden_dim: int = 512
    n_registers: int = 32
    n_shared: int = 8  # registers [0:n_shared] are aligned across modalities, the rest stay private
    n_layers: int = 4
    n_heads: int = 8
    attention: str = "joint"
    nested_dropout: str = "power_of_two"
    nested_dropout_rate: float = 0.5  # `linear` mode: drop probability of the last register
    embed_dim: int = 512  # width of the shared (aligned) embedding
    loss_type: str = "contrastive"
    flow_weight: float = 0.5
    preservation_weight: float = 0.5
    complementary_reg_weight: float = 0.0
    mrl_dims: tuple[int, ...] = ()  # Matryoshka: extra contrastive losses on these leading embedding dims
    decoder_layers: int = 1  # preservation decoder depth
    # rank of a linear read-out of the kept tokens added to the decoder's output (0: attention only). Attention
    # mixes the tokens with one softmax a position; every position reading its own linear function of all kept
    # tokens is what a ridge read-out does, and what lets later tokens' detail reach the reconstruction
    decoder_readout: int = 0
    # rank of a linear read-in: every register starts from its own linear function of all the (projected) input
    # tokens (0: attention only). Softmax attention pools positions by content; the fine factors live in a few
    # dozen principal directions of the frozen features that each span many positions, which a fixed linear map
    # reads at once -- with nested dropout, a linear read-in and read-out order them as PCA does (Rippel et al. 2014)
    encoder_readin: int = 0
    # which registers get it: private (the shared ones read by attention alone, so what alignment keeps stays coarse
    # and the fine scale lands in the private tokens) | all
    readin_tokens: str = "private"
    # none: the preservation decoder reads every kept token | stopgrad: it reads the shared tokens through a
    # stop-gradient, so rebuilding private detail is the private tokens' job | cross: it rebuilds modality A
    # from B's shared tokens and A's private ones | decorrelate: a penalty on the cross-correlation of the
    # shared and private tokens (weight leakage_guard_weight)
    leakage_guard: str = "none"
    leakage_guard_weight: float = 1.0
    alignment_weight: float = 0.0  # confidence-weighted alignment of the paired shared embeddings (alignment_loss)
    token_dim: int | None = None  # numbers one register token may carry (TokenBottleneck); None: hidden_dim
    token_levels: tuple[int, ...] = ()  # FSQ levels of those numbers (FlexTok: 8 8 8 5 5 5); (): not quantised
    bottleneck_tokens: str = "all"  # which tokens pass the bottleneck: all | shared (the private ones stay wide)
    # FSQ warm-up: the fraction of training steps whose codes are tanh-bounded but not yet rounded, so alignment
    # is learned with a smooth gradient before rounding starts (evaluation always rounds)
    round_after: float = 0.0
    init_temperature: float = 0.07

    def __post_init__(self):
        self.modalities, self.mrl_dims = tuple(self.modalities), tuple(self.mrl_dims)
        self.token_levels = tuple(self.token_levels)
        for name, value, allowed in (("design", self.design, DESIGNS), ("attention", self.attention, ATTENTIONS),
                                     ("nested_dropout", self.nested_dropout, DROPOUT_MODES),
                                     ("loss_type", self.loss_type, LOSS_TYPES),
                                     ("leakage_guard", self.leakage_guard, LEAKAGE_GUARDS)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; choose one of {tuple(allowed)}")
        for name in ("hidden_dim", "n_registers", "n_layers", "n_heads", "embed_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be a positive integer, got {getattr(self, name)!r}; e.g. "
                                 f"model.{name}: {getattr(ModelConfig, name)}")
        if len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities {list(self.modalities)} name one twice; give each once, e.g. [vision, touch]")
        unknown = set(self.modalities) - set(MODALITIES)
        if unknown or len(self.modalities) < 2:
            raise ValueError(f"modalities {self.modalities} must be at least two of {MODALITIES}")
        if not 1 <= self.n_shared <= self.n_registers:
            raise ValueError(f"n_shared={self.n_shared} must be between 1 and n_registers={self.n_registers}")
        if self.hidden_dim % self.n_heads:
            raise ValueError(f"hidden_dim={self.hidden_dim} is not divisible by n_heads={self.n_heads}")
        if self.nested_dropout == "power_of_two" and self.n_registers & (self.n_registers - 1):
            raise ValueError(f"nested_dropout='power_of_two' draws k from {{1, 2, 4, ...}} and needs a power-of-two "
                             f"n_registers, got {self.n_registers}; use 'uniform' or n_registers="
                             f"{1 << (self.n_registers.bit_length() - 1)}")
        if self.loss_type == "flow_matching":
            raise ValueError("loss_type 'flow_matching' on its own does not align the modalities: tried with a "
                             "uniformity term against collapse on SynthTouch's default config, the embeddings spread "
                             "but pairs never came together (vision→touch factor R@1 0.03, chance 0.02). Use "
                             "loss_type: combined (--loss_type combined --flow_weight 0.5): contrastive alignment, and "
                             "the flow head for transport retrieval")
        for name in ("preservation_weight", "alignment_weight", "flow_weight", "complementary_reg_weight",
                     "leakage_guard_weight"):
            if not getattr(self, name) >= 0:  # a negative weight turns a loss into one that is maximised
                raise ValueError(f"model.{name} must be 0 (off) or more, got {getattr(self, name)!r}; e.g. "
                                 f"model.{name}: {getattr(ModelConfig, name)}")
        if not 0 <= self.nested_dropout_rate <= 1:
            raise ValueError(f"model.nested_dropout_rate={self.nested_dropout_rate} is the drop probability of the "
                             "last register: give a number in [0, 1], e.g. 0.5")
        if not self.init_temperature > 0:
            raise ValueError(f"model.init_temperature must be positive, got {self.init_temperature!r}; e.g. 0.07")
        if not isinstance(self.decoder_layers, int) or self.decoder_layers < 1:
            raise ValueError(f"model.decoder_layers must be a positive integer, got {self.decoder_layers!r}; e.g. "
                             "model.decoder_layers: 1")
        if len(set(self.mrl_dims)) != len(self.mrl_dims):
            raise ValueError(f"model.mrl_dims {list(self.mrl_dims)} names a width twice, which counts its loss twice; "
                             "give each once")
        for name in ("decoder_readout", "encoder_readin"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"model.{name}={getattr(self, name)!r} is the rank of a linear map between the frozen "
                                 f"tokens and the registers: give 0 (none) or a positive rank, e.g. model.{name}: 64")
        if self.token_dim is not None and not 1 <= self.token_dim <= self.hidden_dim:
            raise ValueError(f"token_dim={self.token_dim} must lie in 1..hidden_dim={self.hidden_dim}, or be null")
        if self.readin_tokens not in ("all", "private"):
            raise ValueError(f"unknown readin_tokens {self.readin_tokens!r}; choose 'private' or 'all'")
        if self.bottleneck_tokens not in ("all", "shared"):
            raise ValueError(f"unknown bottleneck_tokens {self.bottleneck_tokens!r}; choose 'all' or 'shared'")
        if self.token_levels and (self.token_dim != len(self.token_levels) or min(self.token_levels) < 2):
            raise ValueError(f"token_levels={list(self.token_levels)} quantise each of a token's token_dim numbers to "
                             f"that many levels: give one level (at least 2) per number and token_dim="
                             f"{len(self.token_levels)} (token_dim is {self.token_dim})")
        if not 0 <= self.round_after < 1 or (self.round_after and not self.token_levels):
            raise ValueError(f"round_after={self.round_after} is the fraction of training before FSQ codes are "
                             "rounded: give a number in [0, 1) together with token_levels")
        if any(d > self.embed_dim or d < 1 for d in self.mrl_dims):
            raise ValueError(f"mrl_dims {self.mrl_dims} must lie in 1..embed_dim={self.embed_dim}")

    @property
    def prefix_lengths(self) -> list[int]:
        """The k grid every curve is drawn on: 1, 2, 4, ..., n_shared (the complete shared embedding) and
        n_registers itself."""
        return sorted({*doubling_grid(self.n_registers), self.n_shared})


def register_attention_mask(n_features: int, n_registers: int, device=None) -> torch.Tensor:
    """Boolean (T+R)×(T+R) mask for joint attention over [features | registers], True = may attend.

    Features see only features; register i sees every feature and registers 0..i. So register i never
    depends on registers after it, and one forward pass yields the representation for every prefix.
    """
    n = n_features + n_registers
    allowed = torch.zeros(n, n, dtype=torch.bool, device=device)
    allowed[:, :n_features] = True
    allowed[n_features:, n_features:] = torch.ones(n_registers, n_registers, device=device).tril().bool()
    return allowed


class Attention(nn.Module):
    """Multi-head attention. Keys have no bias: adding one vector to every key shifts all logits of a
    query equally, which softmax ignores, so a key bias gets an identically zero gradient (and AdamW
    would turn its rounding noise into steps)."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads, self.q, self.out = n_heads, nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.k, self.v = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim)
        self.record_weights, self.weights = False, None  # set record_weights to keep the attention map

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:2], self.n_heads, -1).transpose(1, 2)  # B×L×D -> B×heads×L×D/heads

    def attend(self, q, k, v, allowed, record: bool = True) -> torch.Tensor:
        """Heads in, B×L×D out. allowed: (B×)L×S bool, or None when every query may see every key."""
        mask = allowed.unsqueeze(1) if allowed is not None and allowed.dim() == 3 else allowed
        if self.record_weights and record:  # the explicit path, only for figures
            logits = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
            probs = (logits if mask is None else logits.masked_fill(~mask, float("-inf"))).softmax(-1)
            self.weights = probs.mean(1).detach()
            y = probs @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).flatten(2))

    def forward(self, x, context, allowed):
        """x: B×L×D queries, context: B×S×D keys/values, allowed: (B×)L×S bool or None."""
        return self.attend(self.heads(self.q(x)), self.heads(self.k(context)), self.heads(self.v(context)), allowed)

    def joint(self, x, n_features: int, feature_allowed, register_allowed, registers_only: bool):
        """Self-attention over x = [features | registers] as register_attention_mask allows it, without computing
        what that mask throws away: features attend to features alone (feature_allowed: B×1×T), registers to
        [features | registers ≤ i] (register_allowed: B×R×(T+R)). `registers_only`: only the registers' rows
        (in the last block nothing reads the features' rows). The map recorded is the registers'."""
        T = n_features
        k, v = self.heads(self.k(x)), self.heads(self.v(x))
        registers = self.attend(self.heads(self.q(x[:, T:])), k, v, register_allowed)
        if registers_only:
            return registers
        features = self.attend(self.heads(self.q(x[:, :T])), k[:, :, :T], v[:, :, :T], feature_allowed, record=False)
        return torch.cat([features, registers], 1)


class MLP(nn.Sequential):
    def __init__(self, dim_in: int, dim_hidden: int, dim_out: int):
        super().__init__(nn.Linear(dim_in, dim_hidden), nn.GELU(), nn.Linear(dim_hidden, dim_out))


class Block(nn.Module):
    """Pre-norm transformer block; with `cross=True` a causal self-attention over the queries is
    followed by cross-attention to a separate context (the features, keys/values only)."""

    def __init__(self, dim: int, n_heads: int, cross: bool):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, n_heads)
        self.cross = Attention(dim, n_heads) if cross else None
        # only what forward uses: an unused parameter breaks DistributedDataParallel's gradient buckets
        self.norm_ctx, self.norm2 = (nn.LayerNorm(dim), nn.LayerNorm(dim)) if cross else (None, None)
        self.norm3, self.mlp = nn.LayerNorm(dim), MLP(dim, 4 * dim, dim)

    def forward(self, x, self_allowed, context=None, cross_allowed=None):
        """x: B×L×D, or 1×L×D when every sample's queries are the same (a decoder's learned queries): their
        self-attention then runs once, and the cross-attention to each sample's context spreads them to B×L×D."""
        h = self.norm1(x)
        x = x + self.attn(h, h, self_allowed)
        if self.cross is not None:
            x = x.expand(len(context), -1, -1)
            x = x + self.cross(self.norm2(x), self.norm_ctx(context), cross_allowed)
        return x + self.mlp(self.norm3(x))

    def joint(self, x, n_features: int, feature_allowed, register_allowed, registers_only: bool = False):
        """forward() on x = [features | registers] under register_attention_mask (see Attention.joint);
        `registers_only` returns the registers' rows alone, skipping the features' attention and MLP."""
        update = self.attn.joint(self.norm1(x), n_features, feature_allowed, register_allowed, registers_only)
        x = (x[:, n_features:] if registers_only else x) + update
        return x + self.mlp(self.norm3(x))


def check_token_shape(tokens: torch.Tensor, num_tokens: int, dim: int):
    _, T, D = tokens.shape
    if D != dim or T != num_tokens:
        raise ValueError(f"features are B×{T}×{D} but this register module was built for B×{num_tokens}×{dim}; "
                         "check the encoder and the feature cache")


class RegisterTokenModule(nn.Module):
    """Input projection + learnable ordered registers + transformer (joint or cross attention).

    Returns all register outputs B×R×hidden; the first `n_shared` are the shared tokens.
    """

    def __init__(self, input_dim: int, num_input_tokens: int, hidden_dim: int, n_registers: int, n_layers: int,
                 n_heads: int, attention: str = "joint", registers_init: torch.Tensor | None = None,
                 readin_rank: int = 0, readin_from: int = 0):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {attention!r}; choose one of {ATTENTIONS}")
        self.input_dim, self.num_input_tokens, self.attention = input_dim, num_input_tokens, attention
        self.in_proj = nn.Sequential(nn.LayerNorm(input_dim), nn.Linear(input_dim, hidden_dim))
        self.feature_pos = nn.Parameter(torch.randn(num_input_tokens, hidden_dim) * 0.02)
        init = registers_init if registers_init is not None else torch.randn(n_registers, hidden_dim) * 0.02
        self.registers = nn.Parameter(init.clone())
        self.blocks = nn.ModuleList(Block(hidden_dim, n_heads, cross=attention == "cross") for _ in range(n_layers))
        self.norm = nn.LayerNorm(hidden_dim)
        self.readin_from = readin_from  # registers before it have no read-in
        self.readin = nn.Sequential(nn.Linear(num_input_tokens * hidden_dim, readin_rank),
                                    nn.Linear(readin_rank, (n_registers - readin_from) * hidden_dim)) \
            if readin_rank and readin_from < n_registers else None

    @property
    def n_registers(self) -> int:
        return len(self.registers)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None, n_registers: int | None = None):
        """tokens: B×T×input_dim frozen features; mask: B×T (True = real token).
        `n_registers` runs with only the first n registers (the prefix property's reference)."""
        check_token_shape(tokens, self.num_input_tokens, self.input_dim)
        B, T, D = tokens.shape
        R = n_registers or self.n_registers
        mask = torch.ones(B, T, dtype=torch.bool, device=tokens.device) if mask is None else mask.bool()
        projected = self.in_proj(tokens)
        feats = projected + self.feature_pos
        regs = self.registers[:R].expand(B, R, -1)
        if self.readin is not None and R > self.readin_from:  # padding positions read as zeros
            read = self.readin((projected * mask[..., None].to(projected.dtype)).flatten(1)).view(B, -1, regs.shape[-1])
            regs = regs + F.pad(read, (0, 0, self.readin_from, 0))[:, :R]
        causal = torch.ones(R, R, dtype=torch.bool, device=tokens.device).tril()
        if self.attention == "joint":
            # register_attention_mask split in two: features see real features, registers also registers <= i
            feature_allowed = mask[:, None, :]
            register_allowed = torch.cat([mask[:, None, :].expand(B, R, T), causal.expand(B, R, R)], 2)
            out = torch.cat([feats, regs], dim=1)
            for i, block in enumerate(self.blocks):
                out = block.joint(out, T, feature_allowed, register_allowed, registers_only=i == len(self.blocks) - 1)
        else:
            cross_allowed = mask[:, None, :].expand(B, R, T)
            out = regs
            for block in self.blocks:
                out = block(out, causal, feats, cross_allowed)
        return self.norm(out)

    @torch.no_grad()
    def attention_maps(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """B×R×T: where each register looks among the input tokens in the last block (mean over heads)."""
        last = self.blocks[-1].attn if self.attention == "joint" else self.blocks[-1].cross
        last.record_weights = True
        try:
            self.forward(tokens, mask)
        finally:
            last.record_weights = False
        return last.weights[:, :, :self.num_input_tokens]  # joint: the rest of each row is registers <= i


def finite_scalar_quantize(z: torch.Tensor, levels: torch.Tensor, rounded: bool = True) -> torch.Tensor:
    """FSQ (Mentzer et al. 2023), as FlexTok's tokens: number i of the last axis is squashed into `levels[i]`
    evenly spaced values in [-1, 1] and rounded to the nearest, with a straight-through gradient. A rounded
    code cannot carry a small leftover of a factor the way a continuous number can: any probe reads a
    continuous residual, however small, once it rescales the features."""
    half = (levels - 1) * (1 + 1e-3) / 2  # the 1e-3 keeps tanh's bound just outside the outermost level
    offset = (levels % 2 == 0).to(z.dtype) * 0.5  # even level counts sit between the integers
    bounded = (z + (offset / half).atanh()).tanh() * half - offset
    if rounded:
        bounded = bounded + (bounded.round() - bounded).detach()
    return bounded / (levels // 2)


class TokenBottleneck(nn.Sequential):
    """What one register token may carry: each token goes down to `dim` numbers and back up to the model's
    width (a rank-`dim` map, applied token by token), with `levels` those numbers are FSQ codes. FlexTok's
    tokens are 6-number FSQ codes; without such a limit one 128-wide token holds every factor of the testbed
    at once, and longer prefixes add nothing."""

    def __init__(self, hidden_dim: int, dim: int, levels: tuple[int, ...] = ()):
        super().__init__(nn.Linear(hidden_dim, dim), nn.Linear(dim, hidden_dim))  # down, up: checkpoint keys 0, 1
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.float32), persistent=False)
        self.warming_up = False  # set by AlignmentModel.before_step while training is inside round_after

    def codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """Each token's `dim` numbers (rounded to the FSQ grid when the bottleneck has levels, except in
        training during the warm-up)."""
        z = self[0](tokens)
        if not len(self.levels):
            return z
        return finite_scalar_quantize(z, self.levels.to(z.dtype), rounded=not (self.training and self.warming_up))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self[1](self.codes(tokens))


class NestedDropout(nn.Module):
    """Keeps a prefix of the registers. Returns a B×R keep mask; dropped registers are *excluded*
    (from pooling and from the preservation decoder's attention) rather than zeroed, which is exactly
    what a forward pass with only k registers computes, so training and one-pass evaluation agree.

    power_of_two: k uniform over {1, 2, 4, ..., R}; uniform: k uniform over 1..R; linear: register i is
    dropped with probability rate·i/(R-1) (0 for the first), nested (dropping i drops all after it);
    none: keep all. Off in eval mode; `keep_k` forces a prefix length in either mode.
    """

    def __init__(self, n_tokens: int, mode: str = "power_of_two", rate: float = 0.5):
        super().__init__()
        if mode not in DROPOUT_MODES:
            raise ValueError(f"unknown nested dropout mode {mode!r}; choose one of {DROPOUT_MODES}")
        self.n_tokens, self.mode, self.rate = n_tokens, mode, rate

    def sample_k(self, batch: int, device=None) -> torch.Tensor:
        R = self.n_tokens
        if self.mode == "power_of_two":
            choices = torch.tensor(doubling_grid(R), device=device)  # R is a power of two (ModelConfig)
            return choices[torch.randint(len(choices), (batch,), device=device)]
        if self.mode == "uniform":
            return torch.randint(1, R + 1, (batch,), device=device)
        if self.mode == "linear":
            drop_prob = self.rate * torch.arange(R, device=device) / max(R - 1, 1)
            u = torch.rand(batch, 1, device=device)
            return (drop_prob[None, :] <= u).sum(1)  # u ~ U(0,1): P(register i dropped) = drop_prob[i]
        return torch.full((batch,), R, device=device)

    def forward(self, batch: int, device=None, keep_k: int | None = None) -> torch.Tensor:
        if keep_k is not None:
            k = torch.full((batch,), keep_k, device=device)
        elif self.training:
            k = self.sample_k(batch, device)
        else:
            k = torch.full((batch,), self.n_tokens, device=device)
        return torch.arange(self.n_tokens, device=device)[None, :] < k[:, None]


class FeatureDecoder(nn.Module):
    """Preservation head: learned per-position queries cross-attend to the kept registers and
    reconstruct the modality's own frozen token features; with `readout_rank`, a rank-limited linear map of the
    kept registers (dropped ones as zeros) is added, one linear function of all of them per output position."""

    def __init__(self, hidden_dim: int, output_dim: int, num_tokens: int, n_layers: int, n_heads: int,
                 n_registers: int = 0, readout_rank: int = 0):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_tokens, hidden_dim) * 0.02)
        self.blocks = nn.ModuleList(Block(hidden_dim, n_heads, cross=True) for _ in range(n_layers))
        self.out = nn.Sequential(nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, output_dim))
        self.n_registers = n_registers
        self.readout = nn.Sequential(nn.Linear(n_registers * hidden_dim, readout_rank),
                                     nn.Linear(readout_rank, num_tokens * output_dim)) if readout_rank else None

    def forward(self, registers: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        B, T = registers.shape[0], len(self.queries)
        # one copy of the queries: the first block's self-attention does not depend on the sample, so it runs
        # once per batch instead of B times (the decoder 1.46x faster at the testbed, bench/bench_decoder.py);
        # its cross-attention makes B rows
        x = self.queries[None]
        cross_allowed = keep[:, None, :].expand(B, T, keep.shape[1])
        for block in self.blocks:
            x = block(x, None, registers, cross_allowed)  # the queries see each other without a mask
        if self.readout is None:
            return self.out(x)
        kept = registers * keep[..., None].to(registers.dtype)
        kept = F.pad(kept, (0, 0, 0, self.n_registers - kept.shape[1]))  # a truncated pass has only its k tokens
        return self.out(x) + self.readout(kept.flatten(1)).view(B, T, -1)


class FeatureMeans(nn.Module):
    """Per modality, the mean frozen token feature (T×D) of the training split: a fixed buffer, saved with the
    weights, that the preservation loss measures reconstruction and target from."""

    def __init__(self, shapes: dict[str, tuple[int, int]]):
        super().__init__()
        for m, shape in shapes.items():
            self.register_buffer(m, torch.zeros(shape))

    def of(self, modality: str) -> torch.Tensor:
        return self.get_buffer(modality)


# ----------------------------------------------------------------------------------------------
# 2. Losses. Each is a plain function of tensors so a test can check it against a direct computation.

def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows (rank order), differentiable, so contrastive negatives span the global batch."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    import torch.distributed.nn.functional as dist_fn
    return torch.cat(dist_fn.all_gather(x), dim=0)


def info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE between L2-normalised rows of a and b (row i of a matches row i of b)."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = logit_scale.exp() * a @ b.T
    labels = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def alignment_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Confidence-weighted alignment: the squared distance between the L2-normalised rows of a pair, weighted
    by how surely InfoNCE already matches them (the softmax probability of the positive, both directions,
    detached). InfoNCE's pull on a positive pair fades as (1 − p), so once pairs are ranked first nothing
    removes what one modality sees and the other cannot (it can sit in directions the other never uses);
    this pull grows with p, so matched pairs keep coming together until their embeddings agree, the alignment
    condition under which contrastive learning keeps only the shared content (Wang & Isola 2020; Daunhawer
    et al. 2023). The weight is p above chance, (p − 1/B)/(1 − 1/B): off while nothing is matched yet, where a
    plain alignment term collapses every embedding to one point (measured: within one epoch at weight 4)."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    with torch.no_grad():
        logits = logit_scale.exp() * a @ b.T
        p = (logits.softmax(1).diagonal() + logits.softmax(0).diagonal()) / 2
        chance = 1 / len(a)
        confidence = (p - chance).clamp(min=0) / (1 - chance)  # 0 up to chance: collapsed rows are not pulled
    return (confidence * (a - b).pow(2).sum(-1)).mean()


def matryoshka_info_nce(a, b, logit_scale, dims: tuple[int, ...]) -> torch.Tensor:
    """Matryoshka (MRL): InfoNCE on the leading `dims` of the embedding, averaged."""
    return torch.stack([info_nce(a[:, :d], b[:, :d], logit_scale) for d in dims]).mean()


def preservation_loss(reconstruction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                      centre: torch.Tensor | None = None) -> torch.Tensor:
    """1 − cosine similarity between reconstructed and frozen token features, over real tokens. With `centre`
    (T×D, the mean feature of each position), both are measured from it: most of a frozen feature's length is what every
    sample shares (position, the encoder's biases), which a raw cosine rewards for free, while what the
    tokens are there to keep is what varies between samples."""
    if centre is not None:
        reconstruction, target = reconstruction - centre, target - centre
    cos = F.cosine_similarity(reconstruction, target, dim=-1)
    mask = mask.to(cos.dtype)
    return 1 - (cos * mask).sum() / mask.sum()


def complementary_regularizer(complementary: torch.Tensor, overlap: torch.Tensor,
                              keep: torch.Tensor | None = None) -> torch.Tensor:
    """FluxTalk's regulariser on the complementary tokens (B×C×D): an L2 penalty on their size plus a
    diversity term, the squared cosine between each complementary token and the overlap mean (B×D),
    so complementary tokens carry something the overlapping ones do not. Averaged over the kept tokens
    only (`keep`: B×C), so the weight means the same whatever nested dropout drew."""
    keep = torch.ones(complementary.shape[:2], device=complementary.device) if keep is None else keep
    keep = keep.to(complementary.dtype)
    if keep.sum() == 0:
        return complementary.sum() * 0  # every complementary token dropped: nothing to regularise
    l2 = complementary.pow(2).mean(-1)  # per dimension, so the weight does not depend on the width
    diversity = F.cosine_similarity(complementary, overlap[:, None, :], dim=-1).pow(2)
    return ((l2 + diversity) * keep).sum() / keep.sum()


def decorrelation_penalty(tokens: torch.Tensor, keep: torch.Tensor, n_shared: int) -> torch.Tensor:
    """Mean squared cross-correlation (over the batch) between the mean kept shared token and the mean kept
    private token, B×R×D tokens: 0 when no linear function of one predicts the other. Rows that kept no
    private token do not count (after Barlow Twins' and VICReg's correlation penalties, across groups)."""
    keep = keep.to(tokens.dtype)[..., None]
    rows = keep[:, n_shared:].sum((1, 2)) > 0
    if rows.sum() < 2:
        return tokens.sum() * 0  # nothing private in this batch to decorrelate from
    shared = (tokens[rows, :n_shared] * keep[rows, :n_shared]).sum(1) / keep[rows, :n_shared].sum(1)
    private = (tokens[rows, n_shared:] * keep[rows, n_shared:]).sum(1) / keep[rows, n_shared:].sum(1)
    standard = [(x - x.mean(0)) / (x.std(0) + 1e-5) for x in (shared, private)]
    return (standard[0].T @ standard[1] / len(shared)).pow(2).mean()


class FlowMatcher(nn.Module):
    """Rectified flow between modalities' shared embeddings (after CrossFlow): a velocity field
    v(x_t, t | A→B) trained on straight paths x_t = (1−t)·x_A + t·x_B, one direction per ordered pair."""

    def __init__(self, dim: int, pairs: list[tuple[str, str]], hidden: int = 512):
        super().__init__()
        self.pairs = [f"{a}->{b}" for a, b in pairs]
        self.direction = nn.Embedding(len(self.pairs), dim)
        self.net = nn.Sequential(nn.Linear(2 * dim + 1, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, dim))

    def velocity(self, x, t, pair: str):
        d = self.direction.weight[self.pairs.index(pair)].expand(len(x), -1)
        return self.net(torch.cat([x, d, t[:, None]], dim=-1))

    def loss(self, x_a, x_b, pair: str) -> torch.Tensor:
        t = torch.rand(len(x_a), device=x_a.device)
        x_t = (1 - t[:, None]) * x_a + t[:, None] * x_b
        return F.mse_loss(self.velocity(x_t, t, pair), x_b - x_a)

    @torch.no_grad()
    def transport(self, x_a, pair: str, steps: int = 10) -> torch.Tensor:
        """Euler-integrate A's (L2-normalised) embedding to B's space."""
        x = F.normalize(x_a, dim=-1)
        for i in range(steps):
            t = torch.full((len(x),), i / steps, device=x.device)
            x = x + self.velocity(x, t, pair) / steps
        return x


# ----------------------------------------------------------------------------------------------
# 3. Design lines and leakage guards: each a class behind one interface, chosen by name from a registry
#    (ModelConfig.design from DESIGNS, ModelConfig.leakage_guard from LEAKAGE_GUARDS). A new design line is
#    one class and one DESIGNS entry; nothing outside this section asks which design a model has.

class LeakageGuard:
    """none: the preservation decoder of a modality rebuilds its features from every kept token of its own."""

    def preservation_input(self, cfg: ModelConfig, modality: str, tokens: dict[str, torch.Tensor],
                           keep: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(registers, keep mask) the preservation decoder of `modality` reads."""
        return tokens[modality], keep[modality]

    def penalty(self, tokens: torch.Tensor, keep: torch.Tensor, n_shared: int) -> torch.Tensor | None:
        """An extra loss on one modality's tokens (weight leakage_guard_weight), or None."""
        return None


class StopGradGuard(LeakageGuard):
    """stopgrad: the decoder reads the shared tokens through a stop-gradient, so rebuilding private detail
    is the private tokens' job."""

    def preservation_input(self, cfg, modality, tokens, keep):
        own = tokens[modality]
        return torch.cat([own[:, :cfg.n_shared].detach(), own[:, cfg.n_shared:]], 1), keep[modality]


class CrossGuard(LeakageGuard):
    """cross: modality A is rebuilt from the next modality's shared tokens beside A's own private ones
    (cross-modal reconstruction), so A's shared tokens gain nothing from carrying A's private detail."""

    def preservation_input(self, cfg, modality, tokens, keep):
        S, names = cfg.n_shared, cfg.modalities
        other = names[(names.index(modality) + 1) % len(names)]
        return (torch.cat([tokens[other][:, :S], tokens[modality][:, S:]], 1),
                torch.cat([keep[other][:, :S], keep[modality][:, S:]], 1))


class DecorrelateGuard(LeakageGuard):
    """decorrelate: a penalty on the cross-correlation of the shared and private tokens."""

    def penalty(self, tokens, keep, n_shared):
        return decorrelation_penalty(tokens, keep, n_shared)


LEAKAGE_GUARDS = {"none": LeakageGuard, "stopgrad": StopGradGuard, "cross": CrossGuard,
                  "decorrelate": DecorrelateGuard}


class RegisterDesign:
    """FlexTok-style registers (the SPEC's first design line): per modality, R learned register tokens read
    the frozen token features; nested dropout keeps a prefix of them in training; the first n_shared are
    pooled into the shared embedding and the rest stay private; a preservation decoder rebuilds the frozen
    features from the kept tokens. Each modality's registers are initialised afresh.

    The interface of every design line: `build` adds its modules to the model (their names are the
    checkpoint's keys); `tokens`, `shared_embedding` and `batch_terms` (a training step's embeddings and the
    losses on tokens); and what callers ask instead of the design's name: `n_tokens`, `shared_k` (tokens in
    the full shared embedding), `token_width`, `prefix_lengths` (the k grid) and `has_registers`."""
    has_registers = True

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.guard = LEAKAGE_GUARDS[cfg.leakage_guard]()

    @property
    def n_tokens(self) -> int:
        return self.cfg.n_registers

    @property
    def shared_k(self) -> int:
        return self.cfg.n_shared

    @property
    def token_width(self) -> int:
        return self.cfg.hidden_dim

    @property
    def prefix_lengths(self) -> list[int]:
        return self.cfg.prefix_lengths

    def registers_init(self) -> torch.Tensor | None:
        """One initialisation every modality's registers start from, or None to draw each afresh."""
        return None

    def input_sizes(self, weights: dict[str, torch.Tensor]) -> tuple[dict[str, int], dict[str, int]] | None:
        """(widths, numbers) of the frozen token features a checkpoint's model was built for, read off its
        tensors: the feature centres are one T×D tensor per modality (None for a checkpoint from before them)."""
        names = [f"feature_centres.{m}" for m in self.cfg.modalities]
        if not all(name in weights for name in names):
            return None
        shapes = {m: weights[name].shape for m, name in zip(self.cfg.modalities, names)}
        return {m: D for m, (T, D) in shapes.items()}, {m: T for m, (T, D) in shapes.items()}

    def build(self, model: nn.Module, input_dims: dict[str, int], input_tokens: dict[str, int]):
        cfg, H = self.cfg, self.cfg.hidden_dim
        clone = self.registers_init()
        model.encoders = nn.ModuleDict({m: RegisterTokenModule(
            input_dims[m], input_tokens[m], H, cfg.n_registers, cfg.n_layers, cfg.n_heads, cfg.attention,
            registers_init=clone, readin_rank=cfg.encoder_readin,
            readin_from=cfg.n_shared if cfg.readin_tokens == "private" else 0) for m in cfg.modalities})
        # What every sample's frozen features share, per position, comes off before the register module, so
        # its attention starts from what differs between samples: without it the touch embeddings of all
        # samples start at cosine 0.997 and contrastive learning sat at chance for 3 to 5 epochs. Set from the
        # training split by set_feature_centres, then learned like a bias.
        model.feature_centres = nn.ParameterDict({m: nn.Parameter(torch.zeros(input_tokens[m], input_dims[m]))
                                                  for m in cfg.modalities})
        # ... and the training mean itself, fixed, which the preservation loss measures both sides from: the
        # learned centre drifts (the default's touch centre by 0.2 against 0.46 of a sample's spread around the
        # mean), and a cosine measured from a drifted point rewards the constant offset, not what varies
        model.feature_means = FeatureMeans({m: (input_tokens[m], input_dims[m]) for m in cfg.modalities})
        model.heads = nn.ModuleDict({m: nn.Linear(H, cfg.embed_dim) for m in cfg.modalities})
        if cfg.token_dim is not None:
            model.bottlenecks = nn.ModuleDict({m: TokenBottleneck(H, cfg.token_dim, cfg.token_levels) for m in cfg.modalities})
        model.dropout = NestedDropout(cfg.n_registers, cfg.nested_dropout, cfg.nested_dropout_rate)
        if cfg.preservation_weight > 0:
            model.decoders = nn.ModuleDict({m: FeatureDecoder(H, input_dims[m], input_tokens[m], cfg.decoder_layers,
                                                              cfg.n_heads, cfg.n_registers, cfg.decoder_readout)
                                            for m in cfg.modalities})

    def tokens(self, model, modality: str, feats: Features, n_registers: int | None = None) -> torch.Tensor:
        check_token_shape(feats.tokens, model.input_tokens[modality], model.input_dims[modality])
        tokens = model.encoders[modality](feats.tokens - model.feature_centres[modality], feats.mask,
                                          n_registers=n_registers)
        if self.cfg.token_dim is None:
            return tokens
        if self.cfg.bottleneck_tokens == "shared":
            S = self.cfg.n_shared
            return torch.cat([model.bottlenecks[modality](tokens[:, :S]), tokens[:, S:]], 1)
        return model.bottlenecks[modality](tokens)

    def shared_embedding(self, model, modality: str, tokens: torch.Tensor, keep: torch.Tensor | None = None):
        """Mean of the kept shared tokens → projection. `keep`: B×R mask from nested dropout."""
        shared = tokens[:, :self.cfg.n_shared]
        weight = (keep[:, :self.cfg.n_shared] if keep is not None else torch.ones(shared.shape[:2], device=shared.device))
        weight = weight.to(shared.dtype)[..., None]
        return model.heads[modality]((shared * weight).sum(1) / weight.sum(1))

    def batch_terms(self, model, batch: dict[str, Features]):
        """A training step's shared embeddings {modality: B×embed_dim} and its losses on tokens
        {name: [one per modality]} (preservation, the guard's decorrelation, complementary)."""
        cfg, emb = self.cfg, {}
        terms = {"preservation": [], "decorrelation": [], "complementary": []}
        B = len(next(iter(batch.values())).pooled)
        tokens_of, keep_of = {}, {}
        for m in cfg.modalities:
            tokens_of[m] = model.tokens(m, batch[m])
            keep_of[m] = model.dropout(B, tokens_of[m].device)
        for m in cfg.modalities:
            tokens, keep = tokens_of[m], keep_of[m]
            emb[m] = self.shared_embedding(model, m, tokens, keep)
            if cfg.preservation_weight > 0:
                recon = model.decoders[m](*self.guard.preservation_input(cfg, m, tokens_of, keep_of))
                # the training mean, not the batch's: every rank of a run uses the same
                centre = model.feature_means.of(m)
                terms["preservation"].append(preservation_loss(recon, batch[m].tokens, batch[m].mask, centre))
            penalty = self.guard.penalty(tokens, keep, cfg.n_shared)
            if penalty is not None:
                terms["decorrelation"].append(penalty)
            if cfg.complementary_reg_weight > 0 and cfg.n_shared < cfg.n_registers:
                # only complementary tokens that survived dropout are regularised
                overlap = tokens[:, :cfg.n_shared].mean(1)
                terms["complementary"].append(
                    complementary_regularizer(tokens[:, cfg.n_shared:], overlap, keep[:, cfg.n_shared:]))
        return emb, terms


class FluxTalkDesign(RegisterDesign):
    """FluxTalk-style (the SPEC's second design line): a few registers, usually with cross attention and
    linear nested dropout (configs/fluxtalk.yaml); every modality's registers start from one clone."""

    def registers_init(self):
        return torch.randn(self.cfg.n_registers, self.cfg.hidden_dim) * 0.02


class AdapterDesign:
    """The MLP-adapter baseline of the seed package: per modality an MLP maps the pooled frozen feature
    straight to the shared embedding, which is its one token. No registers, nested dropout or decoder."""
    has_registers = False
    n_tokens = shared_k = 1

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg

    @property
    def token_width(self) -> int:
        return self.cfg.embed_dim

    @property
    def prefix_lengths(self) -> list[int]:
        return [1]  # one token: its only "prefix" is the full embedding

    def input_sizes(self, weights):
        """As RegisterDesign.input_sizes: the MLP's first layer is hidden×D; it reads pooled features only, so
        the number of tokens is not part of the model (1 stands for any). None when the tensors are not an
        adapter's (then the model is sized from its encoders and loading names what differs)."""
        names = {m: f"encoders.{m}.0.weight" for m in self.cfg.modalities}
        if not all(name in weights and weights[name].dim() == 2 for name in names.values()):
            return None
        return {m: weights[name].shape[1] for m, name in names.items()}, {m: 1 for m in self.cfg.modalities}

    def build(self, model, input_dims, input_tokens):
        model.encoders = nn.ModuleDict({m: MLP(input_dims[m], self.cfg.hidden_dim, self.cfg.embed_dim)
                                        for m in self.cfg.modalities})

    def tokens(self, model, modality, feats, n_registers=None):
        if feats.pooled.shape[-1] != model.input_dims[modality]:
            raise ValueError(f"{modality} features are {feats.pooled.shape[-1]} wide but this adapter was built "
                             f"for {model.input_dims[modality]}; check the encoder and the feature cache")
        return model.encoders[modality](feats.pooled)[:, None, :]

    def shared_embedding(self, model, modality, tokens, keep=None):
        return tokens[:, 0]

    def batch_terms(self, model, batch):
        return {m: model.tokens(m, batch[m])[:, 0] for m in self.cfg.modalities}, {}


DESIGNS = {"flextok": RegisterDesign, "fluxtalk": FluxTalkDesign, "adapter": AdapterDesign}
# how much each loss on tokens weighs: the ModelConfig field
TERM_WEIGHTS = {"preservation": "preservation_weight", "decorrelation": "leakage_guard_weight",
                "complementary": "complementary_reg_weight"}


# ----------------------------------------------------------------------------------------------
# 4. The phase-1 model: a design line plus the losses across modalities, the same for every design

class AlignmentModel(nn.Module):
    """Works on frozen features, so training reads the feature cache and never runs an encoder. The design
    line (`cfg.design`, a DESIGNS class, as `self.design`) builds the modules and turns features into tokens;
    the losses across modalities are the same for every design.

    `input_dims` / `input_tokens`: modality → width / number of the frozen token features.
    """

    def __init__(self, cfg: ModelConfig, input_dims: dict[str, int], input_tokens: dict[str, int]):
        super().__init__()
        missing = [m for m in cfg.modalities if m not in input_dims]
        if missing:
            raise ValueError(f"no input features for modalities {missing}; have {sorted(input_dims)}")
        self.cfg, self.input_dims, self.input_tokens = cfg, dict(input_dims), dict(input_tokens)
        self.design = DESIGNS[cfg.design](cfg)
        self.design.build(self, self.input_dims, self.input_tokens)
        self.logit_scale = nn.Parameter(torch.tensor(1 / cfg.init_temperature).log())
        self.pairs = [(a, b) for i, a in enumerate(cfg.modalities) for b in cfg.modalities[i + 1:]]
        if cfg.loss_type != "contrastive":
            self.flow = FlowMatcher(cfg.embed_dim, self.pairs + [(b, a) for a, b in self.pairs], hidden=cfg.hidden_dim)

    @property
    def n_tokens(self) -> int:
        return self.design.n_tokens

    def tokens(self, modality: str, feats: Features, n_registers: int | None = None) -> torch.Tensor:
        """All output tokens of a modality, B×R×token_width (the adapter's one token is its embedding);
        `n_registers` runs the register module with only its first n registers (the prefix reference)."""
        if modality not in self.encoders:
            raise ValueError(f"this model has no {modality!r} branch; it was trained on {self.cfg.modalities}")
        return self.design.tokens(self, modality, feats, n_registers)

    def shared_embedding(self, modality: str, tokens: torch.Tensor, keep: torch.Tensor | None = None):
        """The shared embedding from a modality's tokens; `keep`: B×R mask from nested dropout."""
        return self.design.shared_embedding(self, modality, tokens, keep)

    def prefix_embeddings(self, modality: str, tokens: torch.Tensor, ks: list[int]) -> dict[int, torch.Tensor]:
        """Shared embedding for every prefix length k from one set of register outputs."""
        B, R = tokens.shape[:2]
        return {k: self.shared_embedding(modality, tokens, torch.arange(R, device=tokens.device)[None] < min(k, R))
                for k in ks}

    def forward(self, batch: dict[str, Features]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One training step's loss and its parts (nested dropout active in train mode)."""
        cfg, parts = self.cfg, {}
        emb, terms = self.design.batch_terms(self, batch)
        gathered = {m: gather_with_grad(e) for m, e in emb.items()}
        loss = torch.zeros((), device=gathered[cfg.modalities[0]].device)
        dims = tuple(cfg.mrl_dims) + (cfg.embed_dim,)
        parts["contrastive"] = torch.stack([matryoshka_info_nce(gathered[a], gathered[b], self.logit_scale, dims)
                                            for a, b in self.pairs]).mean()
        loss = loss + parts["contrastive"]
        if cfg.alignment_weight > 0:
            parts["alignment"] = torch.stack([alignment_loss(gathered[a], gathered[b], self.logit_scale)
                                               for a, b in self.pairs]).mean()
            loss = loss + cfg.alignment_weight * parts["alignment"]
        if cfg.loss_type == "combined":
            # The contrastive loss aligns; the flow head learns to transport the L2-normalised shared embeddings
            # A→B and B→A (detached: it does not shape them, see ModelConfig on flow_matching alone).
            unit = {m: F.normalize(e, dim=-1).detach() for m, e in emb.items()}
            flows = [self.flow.loss(unit[a], unit[b], f"{a}->{b}") for a, b in self.pairs] + \
                    [self.flow.loss(unit[b], unit[a], f"{b}->{a}") for a, b in self.pairs]
            parts["flow"] = torch.stack(flows).mean()
            loss = loss + cfg.flow_weight * parts["flow"]
        for name, values in terms.items():
            if values:
                parts[name] = torch.stack(values).mean()
                loss = loss + getattr(cfg, TERM_WEIGHTS[name]) * parts[name]
        parts["temperature"] = (1 / self.logit_scale.exp()).detach()  # the one used: clamped after each step
        return loss, parts

    def preservation_input(self, modality: str, tokens: dict[str, torch.Tensor], keep: dict[str, torch.Tensor]):
        """(registers, keep mask) the preservation decoder of `modality` rebuilds its features from, per the
        leakage guard (LEAKAGE_GUARDS)."""
        return self.design.guard.preservation_input(self.cfg, modality, tokens, keep)

    @torch.no_grad()
    def set_feature_centres(self, features: dict[str, Features]):
        """Start each modality's feature centre at the mean token of its training features, and fix that mean as
        the point the preservation loss measures from."""
        for m in self.cfg.modalities:
            if m in getattr(self, "feature_centres", {}):
                mean = features[m].mean_token()
                self.feature_centres[m].copy_(mean)
                self.feature_means.of(m).copy_(mean)

    def fitted_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors fit to the training data and then fixed, saved in every checkpoint beside the trainable ones."""
        means = getattr(self, "feature_means", None)
        return {} if means is None else {f"feature_means.{name}": value for name, value in means.named_buffers()}

    def complete_state(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A checkpoint saved before feature centres existed computed exactly what zero centres compute; one saved
        before the fixed feature means measured its preservation loss from its (learned) centres."""
        own = getattr(self, "feature_centres", {})
        tensors = {**{f"feature_centres.{m}": torch.zeros_like(p) for m, p in own.items()}, **tensors}
        return {**{f"feature_means.{m}": tensors[f"feature_centres.{m}"] for m in own}, **tensors}

    def before_step(self, step: int, total_steps: int):
        """The loop's call before each training step: FSQ codes stay unrounded for the first round_after of
        training (a function of the step alone, so a resumed run rounds exactly where it did)."""
        for bottleneck in getattr(self, "bottlenecks", {}).values():
            bottleneck.warming_up = step < self.cfg.round_after * total_steps

    def after_optimizer_step(self):
        """Clamp the temperature parameter itself (as CLIP does), so it stays learnable at the bound."""
        with torch.no_grad():
            self.logit_scale.clamp_(max=math.log(100))

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW must not decay: learned tokens and positions, and the temperature."""
        return {name for name, _ in self.named_parameters()
                if name.rsplit(".", 1)[-1] in ("registers", "feature_pos", "queries", "logit_scale")
                or name.startswith(("flow.direction.", "feature_centres."))}

    @torch.no_grad()
    def reconstruction_cosine(self, modality: str, tokens: torch.Tensor, feats: Features, ks: list[int],
                              centre: torch.Tensor) -> dict[int, torch.Tensor]:
        """Per-sample preservation cosine for every prefix length k (B per k), both sides measured from
        `centre`, the mean feature of the split (`Features.mean_token`), as the preservation loss does."""
        R = tokens.shape[1]
        out = {}
        for k in ks:
            keep = (torch.arange(R, device=tokens.device)[None] < min(k, R)).expand(len(tokens), -1)
            cos = F.cosine_similarity(self.decoders[modality](tokens, keep) - centre, feats.tokens - centre, dim=-1)
            mask = feats.mask.to(cos.dtype)
            out[k] = (cos * mask).sum(1) / mask.sum(1)
        return out


class RegisterTokenLoss(nn.Module):
    """The seeds' name (experiments/stage2/cursor/register_tokens.py) for phase 1's loss, as `AlignmentModel.forward`
    computes it from the model's config: contrastive (Matryoshka) on the shared tokens, preservation, complementary
    regularisation, alignment, flow matching. `loss, parts = RegisterTokenLoss(model)(batch)`."""

    def __init__(self, model: AlignmentModel):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Features]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.model(batch)


# ----------------------------------------------------------------------------------------------
# 5. Raw inputs in, embeddings out: frozen encoders + an AlignmentModel; the seed package's API.

BATCH_KEYS = {"vision": ("vision", "image"), "touch": ("touch",), "text": ("caption",)}


def batch_inputs(batch: dict, modality: str):
    """A modality's raw inputs from a collated batch (SynthTouch, TVL or ImageTextDataset items)."""
    for key in BATCH_KEYS[modality]:
        if key in batch:
            return batch[key]
    raise KeyError(f"batch has no {modality} input (looked for {BATCH_KEYS[modality]}; keys: {sorted(batch)})")


class Aligner(nn.Module):
    """Frozen encoders + a trainable AlignmentModel, from images/captions to tokens and embeddings.

    An encoder may be given as a function that builds it: it is then built on first use (`encoder`), so the
    many callers that only read tokens off cached features (phase 2, the notebooks' analyses) never pay for
    building one (~9 s of imports and set-up for the two testbed encoders)."""

    def __init__(self, encoders: dict[str, FrozenEncoder | Callable[[], FrozenEncoder]], model: AlignmentModel):
        super().__init__()
        self.model = model
        self.encoders = nn.ModuleDict({m: e for m, e in encoders.items() if isinstance(e, nn.Module)})
        self._encoder_builders = {m: e for m, e in encoders.items() if not isinstance(e, nn.Module)}

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    def encoder(self, modality: str) -> FrozenEncoder:
        if modality not in self.encoders:
            if modality not in self._encoder_builders:
                raise ValueError(f"this aligner has no {modality!r} encoder; it has "
                                 f"{sorted([*self.encoders, *self._encoder_builders])}")
            device = next(self.model.parameters()).device
            self.encoders[modality] = self._encoder_builders.pop(modality)().to(device).eval()
        return self.encoders[modality]

    def features(self, modality: str, inputs) -> Features:
        """Features of captions, or of images as `images.image_batch` takes them (paths, PIL images, tensors)."""
        device = next(self.model.parameters()).device
        if modality != "text":
            inputs = image_batch(inputs, self.encoder(modality).cfg.image_size).to(device)
        return Features(*self.encoder(modality)(inputs))

    def tokens(self, modality: str, inputs) -> torch.Tensor:
        return self.model.tokens(modality, self.features(modality, inputs))

    def embed(self, modality: str, inputs, k: int | None = None) -> torch.Tensor:
        """L2-normalised shared embedding from the first k registers (all when k is None)."""
        tokens = self.tokens(modality, inputs)
        k = k or tokens.shape[1]
        return F.normalize(self.model.prefix_embeddings(modality, tokens, [k])[k], dim=-1)

    def forward(self, batch: dict):
        return self.model({m: self.features(m, batch_inputs(batch, m)) for m in self.cfg.modalities})


@dataclass
class AlignmentConfig:
    """The seed package's phase-1 config: frozen CLIP vision + sentence-transformers text, MLP adapters
    to `d_align`, Matryoshka + CLIP contrastive loss. Model names resolve through `ENCODERS`."""
    vision_model_name: str = "openai/clip-vit-base-patch32"
    text_model_name: str = "sentence-transformers/all-MiniLM-L6-v2"
    d_align: int = 512
    hidden_dim: int = 1024
    mrl_dims: tuple[int, ...] = (64, 128, 256)
    batch_size: int = 32
    num_epochs: int = 3
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    seed: int = 42
    device: str | torch.device | None = None  # `cfg.device = get_device()`; VisionTextAligner moves there

    def model_config(self) -> ModelConfig:
        return ModelConfig(design="adapter", modalities=("vision", "text"), hidden_dim=self.hidden_dim,
                           embed_dim=self.d_align, mrl_dims=tuple(d for d in self.mrl_dims if d < self.d_align),
                           n_registers=1, n_shared=1, nested_dropout="none", preservation_weight=0.0)


class VisionTextAligner(Aligner):
    """Phase 1 of the seed package, and the baseline the register models must beat."""

    def __init__(self, cfg: AlignmentConfig):
        encoders = {"vision": create_encoder(cfg.vision_model_name), "text": create_encoder(cfg.text_model_name)}
        model = AlignmentModel(cfg.model_config(), {m: e.dim for m, e in encoders.items()},
                               {m: e.num_tokens for m, e in encoders.items()})
        super().__init__(encoders, model)
        self.config = cfg
        if cfg.device is not None:
            self.to(cfg.device)


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def get_device():
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
