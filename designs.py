"""The model's config (`ModelConfig`, with its k grid `prefix_lengths`) and what it chooses by name: the design lines
and leakage guards, each a class behind one interface, from a registry (ModelConfig.design from `DESIGNS`,
ModelConfig.leakage_guard from `LEAKAGE_GUARDS`). A new design line is one class and one DESIGNS entry; nothing
outside this module asks which design a model has."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

import towers
from encoders import MODALITIES
from features import Features
from losses import complementary_regularizer, decorrelation_penalty, preservation_loss
from registers import (ATTENTIONS, DROPOUT_MODES, FeatureDecoder, FeatureMeans, LOSS_TYPES, MLP, NestedDropout,
                       RegisterTokenModule, TokenBottleneck, check_token_shape, doubling_grid)


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
    # one prefix length per sample for all its modalities: a pair's embeddings are contrasted at the same k. Drawn
    # per modality, a vision prefix of 1 is pulled onto a touch prefix of 4, which trains every prefix to one
    # embedding: the first token takes all and the later ones add nothing to retrieval (with nested_dropout none
    # every register is kept, whichever this says)
    nested_dropout_per_pair: bool = False
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
    # at the end of training, one read-out map per prefix length of the k grid (prefix_lengths) set to its
    # closed-form ridge solution (readout_fit.py), in place of the one map trained for every k: gradient steps left
    # the read-out 0.07 below a ridge read-out of the same tokens, and one map for every k serves short prefixes
    # worse than one per k. The per-k maps are fitted, not trained, so no checkpoint before the last holds them
    decoder_readout_solved: bool = False
    # rank of a linear read-in: every register starts from its own linear function of all the (projected) input
    # tokens (0: attention only). Softmax attention pools positions by content; the fine factors live in a few
    # dozen principal directions of the frozen features that each span many positions, which a fixed linear map
    # reads at once -- with nested dropout, a linear read-in and read-out order them as PCA does (Rippel et al. 2014)
    encoder_readin: int = 0
    # which registers get it: private (the shared ones read by attention alone, so what alignment keeps stays coarse
    # and the fine scale lands in the private tokens) | all
    readin_tokens: str = "private"
    # with readin_tokens private, the rank of a read-in of the shared registers' own (0: attention alone). Attention
    # finds the coarse factors but not what tells one sample from another; a low-rank map gives the shared tokens
    # that much (exact-pair R@1 0.20 -> 0.87 at rank 32 on the testbed) and leaves the fine scale to the private
    # tokens' wider one
    encoder_readin_shared: int = 0
    # ... and nested: shared register i reads only the first (i+1)/n_shared of that map's numbers, so exact-pair
    # retrieval grows with the number of shared tokens instead of arriving whole with the first (ReadIn)
    encoder_readin_shared_nested: bool = False
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
    # after training, keep the shared embedding to the directions along which the modalities' training embeddings
    # correlate at least this much, each modality's coordinates predicted from the other's (agreement.py; 0: every
    # direction, as trained)
    shared_agreement: float = 0.0

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
        if not 0 <= self.shared_agreement < 1:
            raise ValueError(f"model.shared_agreement={self.shared_agreement!r} is the correlation a direction of the "
                             "shared embedding must reach to be kept: give a number in [0, 1), e.g. 0.95 (0: keep all)")
        if self.shared_agreement and self.loss_type != "contrastive":
            # the flow head transports the embedding training made; kept to fewer directions after training, it
            # would be moved by a head that never saw it. So a flow model keeps every direction, and its saved
            # config says so
            warnings.warn(f"model.shared_agreement={self.shared_agreement} is set to 0: loss_type "
                          f"{self.loss_type!r} trains a flow head on every direction of the shared embedding")
            self.shared_agreement = 0.0
        if not self.init_temperature > 0:
            raise ValueError(f"model.init_temperature must be positive, got {self.init_temperature!r}; e.g. 0.07")
        if not isinstance(self.decoder_layers, int) or self.decoder_layers < 1:
            raise ValueError(f"model.decoder_layers must be a positive integer, got {self.decoder_layers!r}; e.g. "
                             "model.decoder_layers: 1")
        if len(set(self.mrl_dims)) != len(self.mrl_dims):
            raise ValueError(f"model.mrl_dims {list(self.mrl_dims)} names a width twice, which counts its loss twice; "
                             "give each once")
        for name in ("decoder_readout", "encoder_readin", "encoder_readin_shared"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"model.{name}={getattr(self, name)!r} is the rank of a linear map between the frozen "
                                 f"tokens and the registers: give 0 (none) or a positive rank, e.g. model.{name}: 64")
        if self.decoder_readout_solved and not self.decoder_readout:
            raise ValueError("model.decoder_readout_solved: true solves the preservation decoder's linear read-out, "
                             "and decoder_readout=0 gives it none: give model.decoder_readout a rank, e.g. 128, or "
                             "set model.decoder_readout_solved: false")
        if self.token_dim is not None and not 1 <= self.token_dim <= self.hidden_dim:
            raise ValueError(f"token_dim={self.token_dim} must lie in 1..hidden_dim={self.hidden_dim}, or be null")
        if self.readin_tokens not in ("all", "private"):
            raise ValueError(f"unknown readin_tokens {self.readin_tokens!r}; choose 'private' or 'all'")
        if self.encoder_readin_shared_nested and self.encoder_readin_shared < self.n_shared:
            raise ValueError(f"model.encoder_readin_shared_nested: true gives each of the n_shared={self.n_shared} "
                             f"shared registers a longer part of the shared read-in, and its rank "
                             f"encoder_readin_shared={self.encoder_readin_shared} has fewer numbers than registers: give "
                             f"a rank of at least {self.n_shared}, e.g. model.encoder_readin_shared: 24")
        if self.encoder_readin_shared and self.readin_tokens == "all":
            raise ValueError(f"model.encoder_readin_shared={self.encoder_readin_shared} gives the shared registers a "
                             "read-in of their own, and readin_tokens 'all' already gives them the private registers' "
                             "one: set model.readin_tokens: private, or model.encoder_readin_shared: 0")
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


class LeakageGuard:
    """none: the preservation decoder of a modality rebuilds its features from every kept token of its own."""
    reads_other_modality = False  # whether preservation_input reads another modality's tokens

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
    reads_other_modality = True

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
            readin_from=cfg.n_shared if cfg.readin_tokens == "private" else 0,
            shared_readin_rank=cfg.encoder_readin_shared,
            shared_readin_nested=cfg.encoder_readin_shared_nested) for m in cfg.modalities})
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
            readout_ks = self.prefix_lengths if cfg.decoder_readout_solved else None  # one read-out map per k
            model.decoders = nn.ModuleDict({m: FeatureDecoder(H, input_dims[m], input_tokens[m], cfg.decoder_layers,
                                                              cfg.n_heads, cfg.n_registers, cfg.decoder_readout,
                                                              readout_ks)
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
        {name: [one per modality]} (preservation, the guard's decorrelation, complementary). Each modality's
        tower runs on a core of its own where towers.side_by_side allows (its guard reads its own tokens only)."""
        cfg = self.cfg
        first = batch[cfg.modalities[0]].tokens
        keep_of = {}
        for m in cfg.modalities:  # drawn before any tower runs: the same draws side by side or one after another
            keep_of[m] = keep_of[cfg.modalities[0]] if cfg.nested_dropout_per_pair and keep_of \
                else model.dropout(len(first), first.device)
        if self.guard.reads_other_modality:
            tokens_of = {m: model.tokens(m, batch[m]) for m in cfg.modalities}
            parts = {m: self.tower_terms(model, m, batch[m], tokens_of, keep_of) for m in cfg.modalities}
        else:
            parts = towers.run(lambda m: self.tower_terms(model, m, batch[m], {m: model.tokens(m, batch[m])}, keep_of),
                               list(cfg.modalities), first.device)
        emb = {m: part.pop("embedding") for m, part in parts.items()}
        terms = {name: [part[name] for part in parts.values() if name in part]
                 for name in ("preservation", "decorrelation", "complementary")}
        return emb, terms

    def tower_terms(self, model, m: str, feats: Features, tokens_of: dict[str, torch.Tensor],
                    keep_of: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Modality m's shared embedding and its losses on tokens, from its register outputs (`tokens_of[m]`)."""
        cfg, tokens, keep = self.cfg, tokens_of[m], keep_of[m]
        out = {"embedding": self.shared_embedding(model, m, tokens, keep)}
        if cfg.preservation_weight > 0:
            recon = model.decoders[m](*self.guard.preservation_input(cfg, m, tokens_of, keep_of))
            # the training mean, not the batch's: every rank of a run uses the same
            out["preservation"] = preservation_loss(recon, feats.tokens, feats.mask, model.feature_means.of(m))
        penalty = self.guard.penalty(tokens, keep, cfg.n_shared)
        if penalty is not None:
            out["decorrelation"] = penalty
        if cfg.complementary_reg_weight > 0 and cfg.n_shared < cfg.n_registers:
            # only complementary tokens that survived dropout are regularised
            out["complementary"] = complementary_regularizer(tokens[:, cfg.n_shared:], tokens[:, :cfg.n_shared].mean(1),
                                                             keep[:, cfg.n_shared:])
        return out


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
