"""The phase-1 model: `AlignmentModel`, a design line plus the losses across modalities on frozen features (the same
for every design), and `Aligner`, frozen encoders in front of it: images and captions in, tokens and embeddings out."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from agreement import AgreedSubspace
from designs import DESIGNS, ModelConfig, TERM_WEIGHTS
from encoders import FrozenEncoder
from features import Features
from images import image_batch
from losses import FlowMatcher, alignment_loss, gather_with_grad, matryoshka_info_nce


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
        if cfg.shared_agreement:
            self.agreed = AgreedSubspace(cfg.embed_dim, cfg.modalities)
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
        """The shared embedding from a modality's tokens; `keep`: B×R mask from nested dropout. With an agreed
        subspace (agreement.py), its coordinates there (of every shared token: predicted from this modality's);
        training's losses read the design's embedding itself."""
        embedding = self.design.shared_embedding(self, modality, tokens, keep)
        if not hasattr(self, "agreed"):
            return embedding
        whole = torch.ones(len(embedding), dtype=torch.bool, device=embedding.device) if keep is None \
            else keep[:, :self.cfg.n_shared].all(1)
        return self.agreed(embedding, modality, whole)

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
        fitted = {} if means is None else {f"feature_means.{name}": value for name, value in means.named_buffers()}
        if hasattr(self, "agreed"):
            fitted |= {f"agreed.{name}": value for name, value in self.agreed.named_buffers()}
        for m, decoder in getattr(self, "decoders", {}).items():  # set by readout_fit
            if hasattr(decoder, "attention_weight"):
                fitted[f"decoders.{m}.attention_weight"] = decoder.attention_weight
            fitted |= {f"decoders.{m}.solved.{name}": p for name, p in decoder.solved.named_parameters()}
        return fitted

    def complete_state(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A checkpoint saved before feature centres existed computed exactly what zero centres compute; one saved
        before the fixed feature means measured its preservation loss from its (learned) centres. A checkpoint whose
        read-out maps were solved (the last of a run with decoder_readout_solved) gets the decoders' room for them; one
        saved when the per-k maps were trained (readout.<g>.*) has them as its solved maps, the last as its trained
        one, which a solved decoder no longer reads. The agreed subspace gets room for the cross-predictions a
        checkpoint holds (none, saved before they existed: the identity, which is what it computed)."""
        for m, decoder in getattr(self, "decoders", {}).items():
            if not hasattr(decoder, "readout_ks"):  # built without per-k maps: load_trainable names what does not fit
                continue
            prefix = f"decoders.{m}.readout."
            trained_per_k = f"{prefix}0.0.weight" in tensors
            for name in [name for name in tensors if name.startswith(prefix) and name.count(".") == 5]:
                g, rest = name.removeprefix(prefix).split(".", 1)  # <g>.<layer>.<weight|bias>
                tensors[f"decoders.{m}.solved.{g}.{rest}"] = value = tensors.pop(name)
                if int(g) == len(decoder.readout_ks) - 1:
                    tensors[prefix + rest] = value
            if trained_per_k or f"decoders.{m}.solved.0.0.weight" in tensors:
                decoder.make_solved_maps()
        if hasattr(self, "agreed"):
            self.agreed.make_room(tensors, "agreed.")
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
