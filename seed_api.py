"""The seed package's API in one place, for code written against it (the README's quick start): each seed name and
what it is in this project. Nothing of the project imports this module; core.py, data.py, train.py and
llm_integration.py re-export its names, so `from core import AlignmentConfig` runs as the seeds wrote it.

    seed name                   here
    set_seed(seed)              seeds Python's, NumPy's and torch's generators; the project seeds what it draws from
                                (loop.step_seed per step, torch.manual_seed for initial weights)
    get_device()                CUDA, else Apple's MPS, else the CPU (training uses phase1.core_device: torchrun's
                                LOCAL_RANK, no MPS)
    AlignmentConfig             phase1.TrainConfig's model part: a designs.ModelConfig of the adapter design
                                (`model_config`) and the optimiser's settings
    VisionTextAligner           alignment.Aligner on the seed's two frozen encoders (encoders.create_encoder)
    RegisterTokenLoss           alignment.AlignmentModel's forward pass: phase 1's loss and its parts
    ImageTextDataset            a dataset of (image, caption) pairs read through images.image_batch; the project's
                                are synthtouch.SynthTouch and layouts.LAYOUTS
    create_dataloader           a DataLoader collating items as feature_cache.collate does
    train_alignment             loop.fit, as train.train uses it, on raw batches and without a run folder
    train_captioning            phase2_train.fit_captioner on the phase-1 tokens of a loader's images
    LLMConfig, MultimodalLLM    the project's own names (llm_config.py, captioner.py)"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

import loop
from alignment import Aligner, AlignmentModel, batch_inputs
from captioner import MultimodalLLM
from designs import ModelConfig
from encoders import create_encoder
from feature_cache import collate
from features import Features
from images import image_batch
from phase2_train import fit_captioner
from text_decoder import check_tokenizer


class RegisterTokenLoss(nn.Module):
    """The seeds' name (experiments/stage2/cursor/register_tokens.py) for phase 1's loss, as `AlignmentModel.forward`
    computes it from the model's config: contrastive (Matryoshka) on the shared tokens, preservation, complementary
    regularisation, alignment, flow matching. `loss, parts = RegisterTokenLoss(model)(batch)`."""

    def __init__(self, model: AlignmentModel):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Features]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.model(batch)


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


class ImageTextDataset(torch.utils.data.Dataset):
    """Pairs of (image, caption); images are file paths, PIL images or 3xHxW tensors, loaded lazily."""

    def __init__(self, images, captions, image_size=224):
        if len(images) != len(captions):
            raise ValueError(f"got {len(images)} images but {len(captions)} captions; they must pair up")
        self.images, self.captions, self.image_size = images, captions, image_size

    @classmethod
    def from_pairs(cls, dataset, modality="vision", image_size=224):
        """View any dataset whose items have `modality` and `caption` keys (SynthTouch, TVLDataset)."""
        captions = dataset.captions if hasattr(dataset, "captions") else _Column(dataset, "caption")
        return cls(_Column(dataset, modality), captions, image_size)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image, size = self.images[i], self.image_size
        if isinstance(image, (str, os.PathLike, Image.Image)):
            image = image_batch(image, size)[0]
        else:
            if image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"image tensors must be 3xHxW, got shape {tuple(image.shape)}")
            image = image.float() / 255 if image.dtype == torch.uint8 else image.float()
            if image.shape[1:] != (size, size):
                image = F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True)[0]
        return dict(image=image, caption=self.captions[i])


class _Column:
    """One key of a dataset's items, as a lazy sequence."""

    def __init__(self, dataset, key):
        self.dataset, self.key = dataset, key

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i][self.key]


def create_dataloader(dataset, batch_size, shuffle=True, num_workers=0, seed=0, drop_last=False):
    generator = torch.Generator().manual_seed(seed)  # the same seed gives the same batches
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                                       collate_fn=collate, generator=generator, drop_last=drop_last)


def train_alignment(model: Aligner, loader, num_epochs: int, lr: float | None = None) -> dict:
    """The seed package's loop: raw (image, caption) batches through the frozen encoders into the
    adapters, by the same loop as everything else (loop.fit), without a run folder. Returns history
    {"loss": [mean loss per epoch], "contrastive": [...], ...}."""
    seed_cfg = getattr(model, "config", None) or AlignmentConfig()
    total = max(1, len(loader) * num_epochs)
    hp = argparse.Namespace(epochs=num_epochs, lr=lr or seed_cfg.learning_rate, weight_decay=seed_cfg.weight_decay,
                            warmup_steps=min(100, total // 10), grad_clip=math.inf, seed=seed_cfg.seed,
                            log_every=max(1, len(loader)))
    loop.check_hyperparameters(hp, "train_alignment")
    rows = loop.fit(model.model, model, lambda epoch: loader, len(loader), hp, desc="train_alignment")
    model.eval()
    history: dict[str, list[float]] = {}
    for row in rows:
        if row["kind"] == "epoch":
            for key, value in row.items():
                if key.startswith("train "):
                    history.setdefault(key[len("train "):], []).append(value)
    return history


def train_captioning(mm_model: MultimodalLLM, loader, num_epochs: int | None = None, **fit_kwargs) -> list[dict]:
    """The seed API's phase 2: train the captioner on a DataLoader of (image, caption) batches, such as
    `create_dataloader(ImageTextDataset(...), batch_size)`. The frozen aligner turns the images into phase-1
    tokens once; `fit_captioner` then trains on them for `num_epochs` epochs of the loader's batch size
    (`fit_kwargs`: output_dir, resume, callback). Returns the metrics rows."""
    tokens, captions = [], []
    for batch in tqdm(loader, desc="phase-1 tokens of the training images", leave=False):
        tokens.append(mm_model.image_tokens(batch_inputs(batch, "vision"))["vision"].cpu())
        captions += list(batch_inputs(batch, "text"))
    check_tokenizer(mm_model.tokenizer, mm_model.decoder.get_input_embeddings().num_embeddings, captions[:16],
                    mm_model.llm_cfg.model_name)
    cfg = mm_model.llm_cfg
    epochs, batch_size = num_epochs or cfg.epochs, min(loader.batch_size or cfg.batch_size, len(captions))
    steps = epochs * (len(captions) // batch_size)
    mm_model.llm_cfg = dataclasses.replace(cfg, epochs=epochs, batch_size=batch_size, min_steps=0,  # epochs as asked
                                           warmup_steps=min(cfg.warmup_steps, steps // 10))
    return fit_captioner(mm_model, {"vision": torch.cat(tokens)}, captions, **fit_kwargs)
