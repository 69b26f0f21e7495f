"""Register tokens, one small class per idea: the k grid (`doubling_grid`), the attention mask and blocks,
`RegisterTokenModule`, the per-token bottleneck with its FSQ rounding (`finite_scalar_quantize`), `NestedDropout`, the
preservation decoder (`FeatureDecoder`) and `FeatureMeans`."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


ATTENTIONS = ("joint", "cross")
DROPOUT_MODES = ("power_of_two", "uniform", "linear", "none")
LOSS_TYPES = ("contrastive", "flow_matching", "combined")


def doubling_grid(n: int) -> list[int]:
    """1, 2, 4, ... below n, then n itself: the prefix lengths k of every curve (phase 1 and phase 2) and the
    ones power_of_two nested dropout draws from."""
    return [1 << i for i in range(n.bit_length()) if 1 << i < n] + [n]


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


class ReadIn(nn.Sequential):
    """A rank-`rank` linear map of all (projected) frozen tokens, flattened (`n_inputs` numbers), to the inputs of
    `n_out` registers of width `width`: down to a code of `rank` numbers, then up to each register (checkpoint
    keys 0, 1). Attention pools positions by content; what spans many positions needs a map of all of them.

    `nested`: register i reads only the code's first round(rank·(i+1)/n_out) numbers, so each longer prefix of
    these registers reads more of the input. Without it the first register alone can take all `rank` numbers, and
    the registers after it add nothing that tells samples apart."""

    def __init__(self, n_inputs: int, rank: int, n_out: int, width: int, nested: bool = False):
        super().__init__(nn.Linear(n_inputs, rank), nn.Linear(rank, n_out * width))
        self.n_out = n_out
        reach = None
        if nested:  # which of the up map's weights exist: register i's rows reach the code's first numbers only
            reach = torch.ones(n_out, width, rank)
            for i in range(n_out):
                reach[i, :, round(rank * (i + 1) / n_out):] = 0
            reach = reach.flatten(0, 1)
        self.register_buffer("reach", reach, persistent=False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        up = self[1]
        weight = up.weight if self.reach is None else up.weight * self.reach
        return F.linear(self[0](inputs), weight, up.bias).view(len(inputs), self.n_out, -1)


class RegisterTokenModule(nn.Module):
    """Input projection + learnable ordered registers + transformer (joint or cross attention).

    Returns all register outputs B×R×hidden; the first `n_shared` are the shared tokens.
    """

    def __init__(self, input_dim: int, num_input_tokens: int, hidden_dim: int, n_registers: int, n_layers: int,
                 n_heads: int, attention: str = "joint", registers_init: torch.Tensor | None = None,
                 readin_rank: int = 0, readin_from: int = 0, shared_readin_rank: int = 0,
                 shared_readin_nested: bool = False):
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
        self.readin = ReadIn(num_input_tokens * hidden_dim, readin_rank, n_registers - readin_from, hidden_dim) \
            if readin_rank and readin_from < n_registers else None
        # the registers before readin_from may get a read-in of their own, of a lower rank
        self.shared_readin = ReadIn(num_input_tokens * hidden_dim, shared_readin_rank, readin_from, hidden_dim,
                                    nested=shared_readin_nested) if shared_readin_rank and readin_from else None

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
        if self.readin is not None or self.shared_readin is not None:  # padding positions read as zeros
            inputs = (projected * mask[..., None].to(projected.dtype)).flatten(1)
        if self.readin is not None and R > self.readin_from:
            regs = regs + F.pad(self.readin(inputs), (0, 0, self.readin_from, 0))[:, :R]
        if self.shared_readin is not None:
            regs = regs + F.pad(self.shared_readin(inputs), (0, 0, 0, max(R - self.readin_from, 0)))[:, :R]
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
    kept registers (dropped ones as zeros) is added, one linear function of all of them per output position.

    With `readout_ks`, the trained map is replaced at the end of training by one map per prefix length of that
    grid (a sample with k kept registers is read by the map of the smallest grid length >= k), which
    readout_fit.solve_readouts sets in closed form, with per map a weight on the attention part (`attention_weight`,
    1 or 0). Those maps are fitted, never trained: the checkpoints written while training hold the one trained map
    and its optimizer state, not the grid's (at TVL's touch tokens, six maps of 20M numbers each)."""

    def __init__(self, hidden_dim: int, output_dim: int, num_tokens: int, n_layers: int, n_heads: int,
                 n_registers: int = 0, readout_rank: int = 0, readout_ks: list[int] | None = None):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_tokens, hidden_dim) * 0.02)
        self.blocks = nn.ModuleList(Block(hidden_dim, n_heads, cross=True) for _ in range(n_layers))
        self.out = nn.Sequential(nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, output_dim))
        self.n_registers = n_registers
        self.map_shape = (n_registers * hidden_dim, readout_rank, num_tokens * output_dim)
        self.readout = self.linear_map() if readout_rank else None
        self.solved = nn.ModuleList()  # the per-k maps, once solved (make_solved_maps)
        if readout_rank and readout_ks:
            self.register_buffer("readout_ks", torch.tensor(sorted(readout_ks)), persistent=False)
            self.register_buffer("attention_weight", torch.ones(len(readout_ks)))

    def linear_map(self, device=None) -> nn.Sequential:
        inputs, rank, outputs = self.map_shape
        return nn.Sequential(nn.Linear(inputs, rank, device=device), nn.Linear(rank, outputs, device=device))

    def make_solved_maps(self):
        """Room for the per-k maps (zeros, frozen) that readout_fit solves or a finished run's checkpoint holds."""
        if not len(self.solved):
            for _ in self.readout_ks:  # built on the meta device: a random start of 120M numbers would be thrown away
                self.solved.append(self.linear_map("meta").to_empty(device=self.queries.device).requires_grad_(False))
            for p in self.solved.parameters():
                p.zero_()

    def attended(self, registers: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The attention part of the reconstruction, B×T×output_dim (all of it without a read-out)."""
        B, T = registers.shape[0], len(self.queries)
        # one copy of the queries: the first block's self-attention does not depend on the sample, so it runs
        # once per batch instead of B times (the decoder 1.46x faster at the testbed, bench/bench_decoder.py);
        # its cross-attention makes B rows
        x = self.queries[None]
        cross_allowed = keep[:, None, :].expand(B, T, keep.shape[1])
        for block in self.blocks:
            x = block(x, None, registers, cross_allowed)  # the queries see each other without a mask
        return self.out(x)

    def kept(self, registers: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """B×n_registers·hidden: the kept registers, dropped ones and those a truncated pass never ran as zeros."""
        kept = registers * keep[..., None].to(registers.dtype)
        return F.pad(kept, (0, 0, 0, self.n_registers - kept.shape[1])).flatten(1)

    def forward(self, registers: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        attended = self.attended(registers, keep)
        if self.readout is None:
            return attended
        kept = self.kept(registers, keep)
        if not len(self.solved):
            return attended + self.readout(kept).view_as(attended)
        which = torch.searchsorted(self.readout_ks, keep.sum(1)).clamp(max=len(self.solved) - 1)
        groups = {g: self.solved[g](kept[which == g]) for g in which.unique().tolist()}  # one per k in the batch
        read = next(iter(groups.values())).new_empty(len(kept), attended[0].numel())  # autocast's dtype, if on
        for g, part in groups.items():
            read[which == g] = part
        return attended * self.attention_weight[which][:, None, None] + read.view_as(attended)


class FeatureMeans(nn.Module):
    """Per modality, the mean frozen token feature (T×D) of the training split: a fixed buffer, saved with the
    weights, that the preservation loss measures reconstruction and target from."""

    def __init__(self, shapes: dict[str, tuple[int, int]]):
        super().__init__()
        for m, shape in shapes.items():
            self.register_buffer(m, torch.zeros(shape))

    def of(self, modality: str) -> torch.Tensor:
        return self.get_buffer(modality)
