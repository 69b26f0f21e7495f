"""Phase 2: captions from any prefix of the register tokens, through a projector and a Qwen decoder.

    python llm_integration.py --phase1_run runs/phase1/default --output_dir runs/phase2/default
    python llm_integration.py --phase1_run RUN --output_dir OUT --model_name /models/Qwen2.5-1.5B-Instruct
    python llm_integration.py --phase1_run runs/phase1/default --output_dir runs/phase2/seeds --seeds 0 1 2
    torchrun --nproc_per_node=4 llm_integration.py --phase1_run runs/phase1/tvl --output_dir runs/phase2/tvl
    python llm_integration.py --phase1_run runs/phase1/default --output_dir runs/phase2/ablation --seeds 0 \
        --ablation --split val

The phase-1 model stays frozen. The first k tokens of the chosen modalities (a `TokenSource`) go through
a per-modality projector into the decoder's embedding space and are spliced into the user turn:
`[chat template head | prefix | prompt, template tail | caption, EOS]`, left-padded. The testbed decoder
is a small Qwen2 (random init, trained fully) with a tokenizer fitted offline on the training captions;
a real Qwen (by hub name or local folder) stays frozen and only the projector (optionally LoRA) trains.
Training runs through the one loop of loop.py, under torchrun with DDP as phase 1 does (each rank a share of every
batch; the loss the mean over all the batch's caption tokens); a run folder holds config.yaml, checkpoint/ (the
projector's and any trained decoder tensors in model.safetensors, state.pt), tokenizer/ (a built-in decoder's),
metrics.jsonl (with the validation split's numbers after every epoch: settings and epochs are chosen on them) and
caption_eval.json (the test split, for reporting; caption_eval_val.json with --split val). On SynthTouch every
evaluated token source carries the linear-probe ceiling of its very tokens beside its caption accuracy. `--seeds`
trains once per seed and writes mean and std over seeds (phase2_<split>.csv/.json); `--ablation` adds the settings
of ABLATIONS.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
# Qwen2ForCausalLM at import time, though AutoModelForCausalLM would find it: its module takes ~5 s to import, which
# a notebook started early (make demo's notebook 04) spends while it waits for its input instead of after
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

import core
import data
import evaluate
import loop
import phase1
import probes
from captions import attribute_accuracy, attribute_baselines, caption_metrics, summarize_accuracy
from config import (Flag, HelpFormatter, add_config_flags, at_most_threads, atomic_write, config_overrides,
                    load_dataclass, shipped_or_given)
from encoders import check_images, hub_or_cache
from features import Features

ROOT = Path(__file__).resolve().parent
DEFAULT_CONFIG = ROOT / "configs" / "phase2.yaml"
# The validation runs that chose configs/phase2.yaml's settings (default phase-1 model, seed 0): every evaluated
# token source of each setting, caption accuracy beside its probe ceiling (notebook 04 draws them)
VALIDATION_REFERENCE = ROOT / "docs" / "phase2" / "validation_ablation.csv"
IMAGE_MODALITIES = ("vision", "touch")  # what a caption is written from; text is the target
REGISTER_GROUPS = ("shared", "private")  # registers [0:n_shared] and [n_shared:]


# ----------------------------------------------------------------------------------------------
# 1. Which tokens feed the decoder

@dataclass(frozen=True)
class TokenSource:
    """The first `k` tokens of each chosen modality, counted among the registers of `groups`.

    groups ("shared", "private") = registers 0..R-1 in order, so k is the prefix length of phase 1
    (k <= n_shared: shared tokens only); ("private",) = registers n_shared..R-1. k=None: all of them;
    k=0: no prefix at all, the control (a caption can then only come from the decoder's prior).
    modalities=None: every image modality of the model.
    """
    modalities: tuple[str, ...] | None = None
    k: int | None = None
    groups: tuple[str, ...] = REGISTER_GROUPS

    def __post_init__(self):
        if self.modalities is not None:
            object.__setattr__(self, "modalities", tuple(self.modalities))
        object.__setattr__(self, "groups", tuple(self.groups))
        if not self.groups or set(self.groups) - set(REGISTER_GROUPS):
            raise ValueError(f"groups {self.groups} must be a non-empty subset of {REGISTER_GROUPS}")
        if self.k is not None and (int(self.k) != self.k or self.k < 0):
            raise ValueError(f"k must be a non-negative integer or None (all tokens), got {self.k!r}")

    @property
    def name(self) -> str:
        if self.k == 0:
            return "none"
        return "+".join(self.modalities or ("all",)) + (f" k={self.k}" if self.k is not None else "")


def prefix_grid(n_tokens: int) -> list[int]:
    """The k values trained and evaluated: 0 (no prefix), 1, 2, 4, ... and n_tokens."""
    return [0] + core.doubling_grid(n_tokens)


# ----------------------------------------------------------------------------------------------
# 2. Decoders: the built-in testbed Qwen2, or a real one by hub name / folder

# Built-in decoders by name: Qwen2 architecture, few layers, random init, with a byte-level BPE tokenizer fitted
# offline on the captions phase 2 trains on (`MultimodalLLM.fit_vocabulary`), so any English reads word by word
# (a fixed vocabulary fitted on other captions cut ordinary words into about a token per letter). Built in memory;
# a trained run keeps its tokenizer in <run>/tokenizer/ and its weights in its checkpoint.
TINY_DECODERS = {
    "synthtouch-qwen2-tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    "synthtouch-qwen2-small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
}
# BPE merges until every word of the fitted captions is one token or the vocabulary is full: SynthTouch's stop at
# 389 tokens; 4096 leaves a larger caption set's rare words in a few pieces while the output layer stays small.
# Before it is fitted, a built-in decoder's tokenizer is the one of runs saved without theirs: fitted on SynthTouch
TOKENIZER_VOCAB, TOKENIZER_CAPTIONS = 4096, 4000
# Qwen's chat format and special tokens, so the tiny decoder is driven exactly like the real one.
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PAD, TURN_START, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
PROMPTS = ("Describe this image:", "Describe this surface:", "Describe how this feels:")


def build_caption_tokenizer(texts: list[str], vocab_size: int = TOKENIZER_VOCAB):
    """A byte-level BPE tokenizer trained on `texts` (any text still encodes), wrapped for transformers."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, TURN_START, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=PAD)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def caption_tokenizer(captions: list[str], prompt: str):
    """The built-in decoders' tokenizer for `captions`: fitted on what the decoder reads, every caption after a chat
    turn, so the template's words are as frequent as the captions' and become single tokens (a row is 6 positions
    shorter than when fitted on captions alone)."""
    prompts = list(dict.fromkeys((prompt, *PROMPTS)))
    turns = [f"system\nuser\n{prompts[i % len(prompts)]}\nassistant\n" for i in range(len(captions))]
    return build_caption_tokenizer(list(captions) + turns)


def random_decoder(tokenizer, seed: int = 0, **architecture) -> Qwen2ForCausalLM:
    """A random-init Qwen2ForCausalLM for `tokenizer`'s vocabulary, the same for the same seed."""
    config = Qwen2Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=False,
                         **architecture)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(config)


def save_tiny_decoder(folder: str | os.PathLike, texts: list[str], vocab_size: int = TOKENIZER_VOCAB,
                      seed: int = 0, **architecture) -> Path:
    """A random-init Qwen2ForCausalLM + a tokenizer trained on `texts`, written with save_pretrained."""
    tokenizer = build_caption_tokenizer(texts, vocab_size)
    random_decoder(tokenizer, seed, **architecture).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def save_tokenizer(tokenizer, folder: Path):
    """save_pretrained beside `folder`, renamed into place: a crash never leaves half a tokenizer in a run."""
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def check_tokenizer(tokenizer, n_embeddings: int, texts, model_name: str):
    """A tokenizer whose special ids fall outside the decoder's embedding, or that cannot write `texts` back,
    trains and captions silently wrong (e.g. a WordLevel tokenizer reloaded as another class): fail at load."""
    outside = {t: i for t, i in zip(tokenizer.all_special_tokens, tokenizer.all_special_ids) if not 0 <= i < n_embeddings}
    if outside:
        raise ValueError(f"the tokenizer of {model_name!r} has special tokens {outside} outside the decoder's "
                         f"embedding ({n_embeddings} rows); give every special token a row (add it to the vocabulary, "
                         "model.resize_token_embeddings(len(tokenizer))) and save both with save_pretrained")
    for text in texts:  # compared without whitespace and case, which word-level tokenizers may change
        ids = tokenizer(text, add_special_tokens=False).input_ids
        back = tokenizer.decode(ids, skip_special_tokens=True)
        if "".join(back.split()).lower() != "".join(text.split()).lower():
            raise ValueError(f"the tokenizer of {model_name!r} does not write text back: {text!r} -> "
                             f"{tokenizer.convert_ids_to_tokens(ids)} -> {back!r}. Its vocabulary lacks these words "
                             "or it was reloaded as another tokenizer class: save it with save_pretrained from "
                             "PreTrainedTokenizerFast(tokenizer_object=...) and check tokenizer_class in "
                             "tokenizer_config.json")


def text_nll(decoder, tokenizer, text: str) -> float:
    """Mean next-token loss (nats) of `text` under the decoder: about ln(vocabulary) for a random decoder."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(decoder.device)
    with torch.no_grad():
        return decoder(input_ids=ids, labels=ids).loss.float().item()


def load_decoder(model_name: str, local_files_only=False, dtype=torch.float32, probe_texts=PROMPTS[:1],
                 tokenizer_dir: str | os.PathLike | None = None, seed: int = 0):
    """(model, tokenizer) by built-in name, hub name or local folder; offline misses fail clearly, and so do
    tokenizers that do not fit the model or cannot write `probe_texts` back. A built-in decoder is random, for the
    tokenizer saved in `tokenizer_dir` (a trained run's) or, without one, the one fitted on SynthTouch."""
    path_like = os.path.isabs(model_name) or model_name.startswith((".", "~")) or model_name.count("/") > 1
    if model_name not in TINY_DECODERS and (path_like or os.path.isdir(model_name)) and \
            not (Path(model_name).expanduser() / "config.json").is_file():
        what = "holds no config.json, so it is no saved decoder" if os.path.isdir(model_name) else "does not exist"
        raise FileNotFoundError(
            f"the decoder folder {model_name} {what}; pass --model_name a folder that save_pretrained wrote (config.json, the weights, the tokenizer files), "
            f"a hub name such as Qwen/Qwen2.5-1.5B-Instruct, or a built-in testbed decoder {sorted(TINY_DECODERS)}")
    try:
        if model_name in TINY_DECODERS:
            tokenizer = (AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else
                         caption_tokenizer(data.SynthTouch(TOKENIZER_CAPTIONS).captions, PROMPTS[0]))
            model = random_decoder(tokenizer, seed, **TINY_DECODERS[model_name])
        else:
            with hub_or_cache():  # the hub when it answers, else the local cache only: no minute of retries
                tokenizer = AutoTokenizer.from_pretrained(model_name, local_files_only=local_files_only)
                model = AutoModelForCausalLM.from_pretrained(model_name, dtype=dtype, local_files_only=local_files_only)
    except OSError as err:
        raise OSError(
            f"cannot load the decoder {model_name!r} ({str(err).splitlines()[0][:300]}) Without network or downloaded "
            "weights, pass --model_name (model_name: in configs/phase2.yaml) <local folder with config.json, the "
            "weights and the tokenizer files> "
            "(e.g. from `huggingface-cli download Qwen/Qwen2.5-1.5B-Instruct --local-dir DIR` on a connected "
            f"machine), or a built-in testbed decoder {sorted(TINY_DECODERS)}") from err
    if tokenizer.pad_token_id is None:
        raise ValueError(f"the tokenizer of {model_name!r} has no pad token, which batched training and generation "
                         f"need; set tokenizer.pad_token (Qwen's is '{PAD}') and save it with save_pretrained")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of {model_name!r} has no eos token, so captions could never end; set "
                         f"tokenizer.eos_token (Qwen chat models use '{EOS}')")
    check_tokenizer(tokenizer, model.get_input_embeddings().num_embeddings, probe_texts, model_name)
    return model, tokenizer


# ----------------------------------------------------------------------------------------------
# 3. Configuration and the projector

PROJECTORS = ("linear", "mlp2x_gelu")
DECODER_TRAINING = ("auto", "frozen", "lora", "full")
# Whitening's floor on a direction's variance, as a fraction of the register's mean variance: it caps a direction's
# gain at 1/sqrt(floor) that of a direction of mean variance, so noise is not blown up. Validation split, touch-only
# captions: 0.1 read 0.96 at k = 16 after 15 epochs where 0.01 read 0.94; after 12 epochs 0.1 read 0.89-0.90 at
# k <= 4 where 1 read 0.81-0.82
WHITENING_FLOOR = 0.1


@dataclass
class LLMConfig:
    """Phase 2's settings. The defaults are the ones chosen on the validation split (configs/phase2.yaml says how);
    that file and any copy of it give only what differs from them."""
    model_name: str = "synthtouch-qwen2-tiny"  # built-in name, hub name (Qwen/Qwen2.5-1.5B-Instruct) or folder
    projector: str = "mlp2x_gelu"  # a two-layer MLP, as in LLaVA-1.5
    # tokens rescaled by training-split statistics before the projector (Projector.fit_statistics): true per
    # channel, "whiten" per register (decorrelated channels), false not at all
    standardize_tokens: bool | str = "whiten"
    source: TokenSource = field(default_factory=TokenSource)  # the most generate() and evaluation feed
    # Training draws, per sample, one modality or all of source.modalities, and k from prefix_grid (0
    # included), so one model captions from any source, and the k=0 / single-modality results are the
    # decoder's honest best rather than inputs it never saw. False: always train on `source` as is.
    mix_sources: bool = True
    # The decoder sees each batch in this many chunks of rows of similar length (MultimodalLLM.loss): rows are
    # padded to the longest of what the decoder sees at once, and with mixed sources random batches of 64 hold
    # 1.6× the positions their rows need; 4 chunks: the same loss, 1.1x-1.3x faster
    length_chunks: int = 4
    train_decoder: str = "auto"  # auto: full for built-in decoders (they start random), frozen otherwise
    lora_r: int = 16
    lora_alpha: int = 32
    prompt: str = "Describe this image:"
    # the longest caption generated, in the decoder's tokens; None: the longest training caption plus a quarter (a
    # test caption may be a little longer), fixed when training starts and saved with the run
    max_new_tokens: int | None = None
    epochs: int = 12
    # a small dataset still trains this many steps: each epoch passes over it as often as that takes (0: once). 12
    # epochs of SynthTouch's 4000 training captions are 744 steps; 8 epochs of 600 captions were 72 and left the
    # decoder unable to write them (caption accuracy 0.01 where 360 steps reached 0.94)
    min_steps: int = 700
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    bf16: bool = True  # on GPU: frozen decoder weights in bf16, forward under bf16 autocast
    # on the CPU, run_phase2 trains and captions on at most this many threads (0: every thread given): a step of
    # the testbed's 2-layer decoder is many small operations, 1.6x slower on two threads than on one (docs/measurements.md, "Speed")
    cpu_threads: int = 1
    local_files_only: bool = False  # never touch the network for the decoder

    def __post_init__(self):
        if isinstance(self.source, dict):
            self.source = TokenSource(**self.source)
        if self.projector not in PROJECTORS:
            raise ValueError(f"unknown projector {self.projector!r}; choose one of {PROJECTORS}")
        if self.train_decoder not in DECODER_TRAINING:
            raise ValueError(f"unknown train_decoder {self.train_decoder!r}; choose one of {DECODER_TRAINING}")
        loop.check_hyperparameters(self, "phase-2 config")
        if self.standardize_tokens not in (False, True, "whiten"):
            raise ValueError(f"standardize_tokens={self.standardize_tokens!r} is not a choice: use true (each channel "
                             "scaled to unit variance), whiten (a register's channels decorrelated too) or false")
        if self.length_chunks < 1:
            raise ValueError(f"length_chunks={self.length_chunks} must be at least 1 (1: the whole batch at once)")
        for name, least, example in (("max_new_tokens", 1, "max_new_tokens: 32 (or null: the longest training caption "
                                      "plus a quarter)"), ("lora_r", 1, "lora_r: 16"), ("lora_alpha", 1, "lora_alpha: 32"),
                                     ("cpu_threads", 0, "cpu_threads: 1 (0: every thread)"), ("min_steps", 0, "min_steps: 0")):
            value = getattr(self, name)
            if value is not None and value < least:
                raise ValueError(f"{name} must be at least {least}, got {value!r} (phase-2 config); e.g. {example}")

    @property
    def decoder_training(self) -> str:
        if self.train_decoder != "auto":
            return self.train_decoder
        return "full" if self.model_name in TINY_DECODERS else "frozen"

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["source"] = {k: list(v) if isinstance(v, tuple) else v for k, v in values["source"].items()}
        return values


def load_llm_config(path: str | os.PathLike | None = None, **overrides) -> LLMConfig:
    """configs/phase2.yaml (or `path`) with overrides; source fields as "source.<name>"."""
    return load_dataclass(LLMConfig, path or DEFAULT_CONFIG, overrides)


class Projector(nn.Module):
    """Phase-1 tokens (width dim_in) → decoder embeddings (dim_out), one each: `linear`, or LLaVA's
    `mlp2x_gelu`, plus a learned embedding per register slot, so the decoder knows which register (of
    which modality: each has its own projector) it reads wherever the token lands in the sequence."""

    def __init__(self, kind: str, dim_in: int, dim_out: int, n_tokens: int, standardize: bool | str = False):
        super().__init__()
        if kind == "linear":
            self.net = nn.Linear(dim_in, dim_out)
        elif kind == "mlp2x_gelu":
            self.net = nn.Sequential(nn.Linear(dim_in, dim_out), nn.GELU(), nn.Linear(dim_out, dim_out))
        else:
            raise ValueError(f"unknown projector {kind!r}; choose one of {PROJECTORS}")
        self.slots = nn.Parameter(torch.randn(n_tokens, dim_out) * 0.02)
        # `standardize` (LLMConfig.standardize_tokens): tokens centred by `shift` and rescaled by `scale` per
        # register: True scales each channel (scale R×dim_in), "whiten" multiplies by a whitening matrix (scale
        # R×dim_in×dim_in). Fit to the training split by `fit_statistics`, then fixed, as a probe's StandardScaler
        # is; the checkpoint keeps them (MultimodalLLM.fitted_tensors). Trained along, AdamW's steps of about lr
        # on every entry undid the whitening (validation, 15 epochs: touch-only captions at k <= 4 0.84-0.86,
        # fixed 0.90-0.91).
        if standardize:
            self.register_buffer("shift", torch.zeros(n_tokens, dim_in))
            self.register_buffer("scale", torch.eye(dim_in).repeat(n_tokens, 1, 1) if standardize == "whiten"
                                 else torch.ones(n_tokens, dim_in))
        else:
            self.shift = self.scale = None
        self.dim_in, self.dim_out = dim_in, dim_out

    @torch.no_grad()
    def fit_statistics(self, tokens: torch.Tensor):
        """Fit shift and scale to `tokens` (N×R×dim_in). Per channel: mean 0, std 1, as a linear probe's
        StandardScaler does, so that a channel's small variance does not hide what it holds. Whitening: every
        direction of a register's channels at about unit variance (ZCA: the eigenvectors of the covariance kept,
        each eigenvalue λ scaled by 1 / sqrt(λ + WHITENING_FLOOR · mean λ), so directions of near-zero variance
        are not blown up). What a register holds in a combination of channels of small variance is then as
        loud as the rest, which is what lets the decoder learn it in a few epochs (configs/phase2.yaml)."""
        self.shift.copy_(tokens.mean(0))
        if self.scale.dim() == 2:
            self.scale.copy_(1 / tokens.std(0).clamp_min(1e-6))
            return
        centred = (tokens - self.shift).double()
        covariance = torch.einsum("nrd,nre->rde", centred, centred) / max(len(tokens) - 1, 1)
        eigenvalues, vectors = torch.linalg.eigh(covariance)
        eigenvalues = eigenvalues.clamp_min(0) + WHITENING_FLOOR * eigenvalues.mean(-1, keepdim=True) + 1e-12
        self.scale.copy_((vectors * eigenvalues.rsqrt()[:, None, :]) @ vectors.transpose(1, 2))

    def forward(self, tokens: torch.Tensor, index: list[int]) -> torch.Tensor:
        """tokens B×R×dim_in → B×len(index)×dim_out for registers `index`."""
        tokens = tokens[:, index]
        if self.shift is not None:
            centred = tokens - self.shift[index]
            tokens = (torch.einsum("brd,rde->bre", centred, self.scale[index]) if self.scale.dim() == 3
                      else centred * self.scale[index])
        return self.net(tokens) + self.slots[index]


# ----------------------------------------------------------------------------------------------
# 4. The multimodal model: a frozen phase-1 aligner, one projector per image modality, a decoder

class MultimodalLLM(nn.Module):
    """`generate([image], prompt=...)`, `generate(touch=[image])` or both → one caption per sample."""

    PREFIX_MARK = "\x00prefix\x00"  # where the prefix goes inside the chat template (never tokenized)
    UNFITTED = 32  # max_new_tokens of a captioner whose config leaves it to the training captions, before it saw any

    def __init__(self, aligner: core.Aligner, llm_cfg: LLMConfig | None = None,
                 tokenizer_dir: str | os.PathLike | None = None):
        """`tokenizer_dir`: a built-in decoder's tokenizer as a trained run saved it (`load` passes it)."""
        super().__init__()
        self.llm_cfg = cfg = llm_cfg or LLMConfig()
        self.aligner = aligner.eval().requires_grad_(False)
        phase1_cfg = aligner.cfg
        self.modalities = tuple(m for m in phase1_cfg.modalities if m in IMAGE_MODALITIES)
        if not self.modalities:
            raise ValueError(f"the aligner has no image modality to caption from (it has {phase1_cfg.modalities})")
        self.n_registers = aligner.model.n_tokens
        self.n_shared = aligner.model.design.shared_k
        device = next(aligner.model.parameters()).device
        half = device.type == "cuda" and cfg.bf16 and cfg.decoder_training != "full"
        decoder, self.tokenizer = load_decoder(cfg.model_name, cfg.local_files_only,
                                               torch.bfloat16 if half else torch.float32, (cfg.prompt,), tokenizer_dir,
                                               cfg.seed)
        self.hidden = decoder.config.hidden_size
        self.attach_decoder(decoder.to(device))
        self.projector = nn.ModuleDict({
            m: Projector(cfg.projector, aligner.model.design.token_width, self.hidden, self.n_registers, cfg.standardize_tokens)
            for m in self.modalities
        }).to(device)
        self.source = self.resolve(cfg.source)
        self.trained = False  # by fit_captioner or load_weights; generate warns once while it is not
        self._said_untrained = False

    @property
    def device(self) -> torch.device:
        return next(self.projector.parameters()).device

    def attach_decoder(self, decoder):
        """The decoder, trainable per train_decoder (LoRA adapters added for lora)."""
        cfg = self.llm_cfg
        decoder.requires_grad_(cfg.decoder_training == "full")
        if cfg.decoder_training == "lora":
            from peft import LoraConfig, get_peft_model
            decoder = get_peft_model(decoder, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, task_type="CAUSAL_LM",
                                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        self.decoder = decoder
        self._prompt_ids = {}
        if cfg.decoder_training == "frozen":
            self.warn_if_untrained()

    def fit_vocabulary(self, captions: list[str], folder: Path | None = None, resume: bool = False, save: bool = True):
        """Before a built-in decoder's first step: its tokenizer fitted on `captions` (`caption_tokenizer`) and a
        fresh random decoder of that vocabulary in place of the untrained one, so the captions it learns read word by
        word. Saved as <folder>/tokenizer (unless `save` is false: a torchrun rank other than 0); a resumed run gets
        its own back (one saved before runs kept theirs used the SynthTouch tokenizer this model starts with). Other
        decoders keep their tokenizer."""
        if self.llm_cfg.model_name not in TINY_DECODERS:
            return
        saved = None if folder is None else Path(folder) / "tokenizer"
        if resume:
            if saved is None or not (saved / "tokenizer.json").is_file():
                return
            self.tokenizer = AutoTokenizer.from_pretrained(saved)
        else:
            self.tokenizer = caption_tokenizer(captions, self.llm_cfg.prompt)
            if saved is not None and save:
                save_tokenizer(self.tokenizer, saved)
        decoder = random_decoder(self.tokenizer, self.llm_cfg.seed, **TINY_DECODERS[self.llm_cfg.model_name])
        self.attach_decoder(decoder.to(self.device))

    def warn_if_untrained(self):
        """A frozen decoder must already write language. A random one predicts the next token no better than
        uniform guessing (loss about ln V); 0.8 ln V leaves room for chance structure, while a trained model sits
        far below (a few nats for a short prompt)."""
        nll = text_nll(self.decoder, self.tokenizer, self.llm_cfg.prompt)
        chance = math.log(self.decoder.get_input_embeddings().num_embeddings)
        if nll > 0.8 * chance:
            warnings.warn(f"the decoder {self.llm_cfg.model_name!r} predicts its prompt no better than chance ({nll:.2f} "
                          f"nats per token; uniform guessing {chance:.2f}): it looks randomly initialised, and frozen "
                          f"(train_decoder={self.llm_cfg.train_decoder!r}) it can only write garbage. Pass "
                          "train_decoder='full' to train it, or a pretrained decoder", stacklevel=3)

    def train(self, mode: bool = True):
        super().train(mode)
        self.aligner.eval()  # phase 1 is frozen, dropout included
        if self.llm_cfg.decoder_training == "frozen":
            self.decoder.eval()
        return self

    # --- which tokens

    def register_index(self, groups) -> list[int]:
        shared, private = list(range(self.n_shared)), list(range(self.n_shared, self.n_registers))
        index = (shared if "shared" in groups else []) + (private if "private" in groups else [])
        if not index:
            raise ValueError(f"this phase-1 model has no {'/'.join(groups)} tokens "
                             f"({self.n_registers} registers, {self.n_shared} shared)")
        return index

    def resolve(self, source: TokenSource | None) -> TokenSource:
        """The source with its defaults filled in, checked against this model."""
        source = source or self.llm_cfg.source
        modalities = source.modalities or self.modalities
        unknown = [m for m in modalities if m not in self.modalities]
        if unknown:
            raise ValueError(f"token source asks for {unknown}, but this model captions from {self.modalities}")
        n = len(self.register_index(source.groups))
        if source.k is not None and source.k > n:
            raise ValueError(f"k={source.k} but the chosen groups {source.groups} hold only {n} tokens per modality")
        return TokenSource(tuple(modalities), n if source.k is None else source.k, source.groups)

    def keep_masks(self, source: TokenSource, batch: int) -> dict[str, torch.Tensor]:
        """B×n bool per modality: True on the first k chosen tokens of the source's modalities."""
        n = len(self.register_index(source.groups))
        first_k = torch.arange(n) < source.k
        return {m: (first_k & (m in source.modalities)).expand(batch, n) for m in self.modalities}

    def training_keep_masks(self, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Per sample: one modality or all of them, and k from prefix_grid (see LLMConfig.mix_sources)."""
        source = self.source
        if not self.llm_cfg.mix_sources:
            return self.keep_masks(source, batch)
        n = len(self.register_index(source.groups))
        subsets = [source.modalities] + ([(m,) for m in source.modalities] if len(source.modalities) > 1 else [])
        grid = torch.tensor([k for k in prefix_grid(n) if k <= source.k])
        subset = torch.randint(len(subsets), (batch,), generator=generator)
        first_k = torch.arange(n)[None, :] < grid[torch.randint(len(grid), (batch,), generator=generator)][:, None]
        uses = torch.tensor([[m in s for m in self.modalities] for s in subsets])[subset]  # B×modalities
        return {m: first_k & uses[:, i, None] for i, m in enumerate(self.modalities)}

    def image_tokens(self, images=None, touch=None) -> dict[str, torch.Tensor]:
        """Phase-1 tokens {modality: B×R×width} of paired vision and/or touch images."""
        given = {m: x for m, x in (("vision", images), ("touch", touch)) if x is not None}
        if not given:
            raise ValueError("pass vision images and/or touch=[...] images")
        tokens = {m: self.aligner.tokens(m, self.check_images(m, x)) for m, x in given.items()}
        sizes = {m: len(t) for m, t in tokens.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"vision and touch images are paired, but their counts differ: {sizes}")
        return tokens

    def check_images(self, modality: str, images) -> torch.Tensor:
        """Images as `data.image_batch` takes them (file paths and PIL images resized to the encoder's size; 3×S×S
        tensors in [0, 1]) → B×3×S×S."""
        if modality not in self.modalities:
            raise ValueError(f"this model has no {modality} branch; it captions from {self.modalities}")
        size = self.aligner.encoder(modality).cfg.image_size
        images = check_images(data.image_batch(images, size), modality)
        if min(images.shape[-2:]) < size:  # larger images are resized by the encoder, as in phase 1
            raise ValueError(f"{modality} images are {tuple(images.shape[-2:])} pixels but the {modality} encoder "
                             f"takes {size}×{size}; resize them (e.g. data.ImageTextDataset(..., image_size={size}))")
        return images

    def prefix(self, tokens: dict[str, torch.Tensor], keep: dict[str, torch.Tensor], groups=REGISTER_GROUPS):
        """Projected tokens B×P×hidden and their mask B×P (False = not in this sample's prefix)."""
        index = self.register_index(groups)
        embeds, masks = [], []
        for m in self.modalities:
            if not keep[m].any():
                continue
            if m not in tokens:
                raise ValueError(f"the token source uses {m!r} but no {m} tokens were given")
            projector, width = self.projector[m], tokens[m].shape[-1]
            if width != projector.dim_in:
                raise ValueError(f"the {m} tokens are {width} wide but the {m} projector takes {projector.dim_in}; "
                                 "build the projector for this phase-1 model (aligner.model.design.token_width)")
            if projector.dim_out != self.hidden:
                raise ValueError(f"the {m} projector outputs width {projector.dim_out} but the decoder's hidden size "
                                 f"is {self.hidden}; build the projector for this decoder")
            embeds.append(projector(tokens[m].to(self.device), index))
            masks.append(keep[m].to(self.device))
        if not embeds:  # k = 0: no prefix at all
            batch = len(next(iter(keep.values())))
            return (torch.zeros(batch, 0, self.hidden, device=self.device),
                    torch.zeros(batch, 0, dtype=torch.bool, device=self.device))
        return torch.cat(embeds, 1), torch.cat(masks, 1)

    # --- decoder inputs

    def prompt_ids(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids before and after the prefix: with a chat template, the user turn holds prefix + prompt."""
        if prompt not in self._prompt_ids:
            tok = self.tokenizer
            if tok.chat_template:
                text = tok.apply_chat_template([{"role": "user", "content": self.PREFIX_MARK + prompt}],
                                               tokenize=False, add_generation_prompt=True)
                before, after = text.split(self.PREFIX_MARK)
            else:
                before, after = "", prompt
            self._prompt_ids[prompt] = tuple(torch.tensor(tok(t, add_special_tokens=False).input_ids, dtype=torch.long)
                                             for t in (before, after))
        return self._prompt_ids[prompt]

    def caption_ids(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Caption ids + EOS, right-padded, and their mask, from lengths: EOS is learned even if pad == eos."""
        rows = [ids + [self.tokenizer.eos_token_id]
                for ids in self.tokenizer(list(captions), add_special_tokens=False).input_ids]
        lengths = torch.tensor([len(r) for r in rows])
        ids = torch.full((len(rows), int(lengths.max())), self.tokenizer.pad_token_id, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
        mask = torch.arange(ids.shape[1])[None] < lengths[:, None]
        return ids.to(self.device), mask.to(self.device)

    def assemble(self, prefix: torch.Tensor, prefix_mask: torch.Tensor, prompt: str, captions=None,
                 new_tokens: int = 0) -> dict[str, torch.Tensor]:
        """[template head | prefix | prompt, template tail | caption, EOS] → left-padded decoder inputs.

        Every part is laid out at full width with a mask; a stable sort then moves each row's real
        positions to the right, in order, so rows with shorter prefixes or captions are left-padded.
        Labels are -100 everywhere except on caption tokens and EOS.
        """
        batch, embed = len(prefix), self.decoder.get_input_embeddings()
        before, after = (ids.to(self.device).expand(batch, -1) for ids in self.prompt_ids(prompt))

        def part(ids, mask=None, learn=False):  # (embeddings, mask, labels) of token ids
            mask = torch.ones(ids.shape, dtype=torch.bool, device=self.device) if mask is None else mask
            return embed(ids), mask, ids.masked_fill(~mask, -100) if learn else torch.full_like(ids, -100)

        no_labels = torch.full(prefix_mask.shape, -100, dtype=torch.long, device=self.device)
        parts = [part(before), (prefix.to(embed.weight.dtype), prefix_mask, no_labels), part(after)]
        if captions is not None:
            parts.append(part(*self.caption_ids(captions), learn=True))
        embeds, mask, labels = (torch.cat(x, 1) for x in zip(*parts))
        order = torch.sort(mask.to(torch.int8), dim=1, stable=True).indices
        order = order[:, int((~mask).sum(1).min()):]  # drop columns that are padding in every row
        mask = mask.gather(1, order)
        context = self.decoder.config.max_position_embeddings
        if mask.shape[1] + new_tokens > context:
            raise ValueError(
                f"prompt ({before.shape[1] + after.shape[1]} tokens with the template) + prefix (up to "
                f"{prefix.shape[1]}) + {'caption' if captions is not None else f'max_new_tokens={new_tokens}'} = "
                f"{mask.shape[1] + new_tokens} tokens exceed the decoder's context of {context}; shorten the "
                "prompt or use fewer tokens (k) / max_new_tokens")
        out = {"inputs_embeds": embeds.gather(1, order[..., None].expand(-1, -1, embeds.shape[-1])),
               "attention_mask": mask.long(),
               "position_ids": (mask.long().cumsum(1) - 1).clamp(min=0)}
        if captions is not None:
            out["labels"] = labels.gather(1, order)
        return out

    def autocast(self):
        enabled = self.device.type == "cuda" and self.llm_cfg.bf16
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def loss(self, tokens: dict[str, torch.Tensor], captions: list[str], keep: dict[str, torch.Tensor],
             prompt: str | None = None) -> torch.Tensor:
        """Next-token cross-entropy on the captions and EOS, given prefix + prompt: the mean over every caption
        token of the batch."""
        total, counted = self(tokens, captions, keep, prompt)
        return total / counted

    def forward(self, tokens: dict[str, torch.Tensor], captions: list[str], keep: dict[str, torch.Tensor],
                prompt: str | None = None) -> tuple[torch.Tensor, int]:
        """`loss` as its sum over the batch's caption tokens and their count (under torchrun each rank holds a part
        of the batch: loop.Distributed.global_mean makes the mean over all of them). With `length_chunks` > 1 the
        rows, sorted by length, go through the decoder in that many chunks, each cut to its own longest row instead
        of the batch's: the same mean and gradient (up to float rounding: left padding leaves each row's logits
        unchanged) from fewer computed positions."""
        prefix, prefix_mask = self.prefix(tokens, keep, self.source.groups)
        inputs = self.assemble(prefix, prefix_mask, self.llm_cfg.prompt if prompt is None else prompt, captions)
        lengths = inputs["attention_mask"].sum(1)
        total, counted = 0.0, 0
        for rows in lengths.argsort().chunk(self.llm_cfg.length_chunks):
            width = int(lengths[rows].max())  # rows are left-padded: their real positions are the last `width`
            chunk = {name: value[rows, -width:] for name, value in inputs.items()}
            labels = chunk.pop("labels")
            # captions end every row, so their labels fill the last columns: the decoder's output layer runs only
            # from the position before the first of them (about a third of the positions; 5-10% of a step)
            first = max(1, int((labels != -100).any(0).nonzero()[0]))
            with self.autocast():
                logits = self.decoder(**chunk, use_cache=False, logits_to_keep=width - first + 1).logits[:, :-1]
            targets = labels[:, first:]
            total = total + nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                                        ignore_index=-100, reduction="sum")
            counted += int((targets != -100).sum())
        return total, counted

    # --- generation

    @torch.no_grad()
    def generate(self, images=None, prompt: str | None = None, touch=None, k: int | None = None,
                 **generate_kwargs) -> list[str]:
        """Captions of vision images, touch images, or both (paired), from the first k tokens of each
        (default: the configured source). `generate_kwargs` go to `decoder.generate` (num_beams,
        do_sample, temperature, top_p, max_new_tokens, ...)."""
        tokens = self.image_tokens(images, touch)
        k = self.source.k if k is None else k
        return self.generate_from_tokens(tokens, TokenSource(tuple(tokens), k, self.source.groups), prompt,
                                         **generate_kwargs)

    @torch.no_grad()
    def generate_from_tokens(self, tokens: dict[str, torch.Tensor], source: TokenSource | None = None,
                             prompt: str | None = None, batch_size: int = 256, **generate_kwargs) -> list[str]:
        """Captions from phase-1 tokens ({modality: N×R×width}): batched, left-padded, KV-cached, greedy
        unless `generate_kwargs` ask for beams or sampling."""
        source = self.resolve(source)
        if not self.trained and not self._said_untrained:
            self._said_untrained = True
            what = "projector and decoder" if self.llm_cfg.decoder_training == "full" else "projector"
            warnings.warn(f"this captioner's {what} {'were' if 'and' in what else 'was'} never trained, so its "
                          "captions are noise: call train_captioning(mm_model, loader) first (or fit_captioner on "
                          "phase-1 tokens), or load a trained run with MultimodalLLM.load(RUN)", stacklevel=3)
        n = len(next(iter(tokens.values())))
        kwargs = dict(max_new_tokens=self.llm_cfg.max_new_tokens or self.UNFITTED, do_sample=False, num_beams=1,
                      use_cache=True, pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
        kwargs.update(generate_kwargs)
        was_training = self.training
        self.eval()
        captions = []
        for start in tqdm(range(0, n, batch_size), desc=f"captions ({source.name})", leave=False,
                          disable=n <= batch_size):
            chunk = {m: t[start:start + batch_size] for m, t in tokens.items()}
            prefix, prefix_mask = self.prefix(chunk, self.keep_masks(source, len(next(iter(chunk.values())))),
                                              source.groups)
            inputs = self.assemble(prefix, prefix_mask, self.llm_cfg.prompt if prompt is None else prompt,
                                   new_tokens=kwargs["max_new_tokens"])
            inputs.pop("position_ids")  # generate derives them from the attention mask, the same way
            with self.autocast():
                out = self.decoder.generate(**inputs, **kwargs)
            captions += [c.strip() for c in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
        self.train(was_training)
        return captions

    # --- checkpoints: safetensors + config.yaml, each written atomically

    def fitted_tensors(self) -> dict[str, torch.Tensor]:
        """The projectors' token statistics (standardize_tokens): fit to the training split, then fixed."""
        return {f"projector.{name}": value for name, value in self.projector.named_buffers()}

    def trainable_decoder_state(self) -> dict[str, torch.Tensor]:
        """The decoder tensors that train: all for `full`, the adapters for `lora`, none when frozen."""
        return {n: p for n, p in self.decoder.named_parameters() if p.requires_grad}

    def run_config(self, extra: dict | None = None) -> dict:
        """What config.yaml of a phase-2 run folder holds: the config, the decoder width, the phase-1 run."""
        return {"llm": self.llm_cfg.to_dict(), "decoder_hidden_size": self.hidden, **(extra or {})}

    def load_weights(self, run_dir: str | os.PathLike) -> "MultimodalLLM":
        run = loop.RunFolder(run_dir)
        saved = run.saved_config()
        if saved["decoder_hidden_size"] != self.hidden:
            raise ValueError(f"the projector in {run.path} outputs width {saved['decoder_hidden_size']} (for "
                             f"{saved['llm']['model_name']}) but this decoder ({self.llm_cfg.model_name}) has hidden "
                             f"size {self.hidden}; load it with the decoder it was trained for, or train a new one")
        loop.load_trainable(self, run.load_weights(), run.path)
        self.trained = True
        return self

    @classmethod
    def load(cls, run_dir: str | os.PathLike, aligner: core.Aligner | None = None) -> "MultimodalLLM":
        """A trained phase-2 model from its run folder, on `aligner` (default: its phase-1 run's), from any working
        directory: the phase-1 run is found relative to this one, as config.yaml keeps it."""
        run = run_folder(run_dir)
        if not run.config_path.is_file():
            raise FileNotFoundError(f"{run.path} is not a phase-2 run folder (no config.yaml in it); pass the "
                                    "--output_dir of a finished llm_integration.py run, e.g. runs/phase2/default")
        saved = run.saved_config()
        if aligner is None:
            phase1_run = phase1.from_run(saved["phase1_run"], run.path)
            check_phase1_weights(run, phase1_run, phase1.finished_weights(phase1_run))
            aligner = phase1.load_aligner(phase1_run)
        llm = LLMConfig(**{k: v for k, v in saved["llm"].items() if k not in RETIRED})
        tokenizer = run.path / "tokenizer"
        return cls(aligner, llm, tokenizer if tokenizer.is_dir() else None).load_weights(run.path)


# ----------------------------------------------------------------------------------------------
# 5. Training on precomputed phase-1 tokens

@torch.no_grad()
def encode_tokens(model: core.AlignmentModel, feats: dict[str, Features],
                  batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Phase-1 tokens of every sample, {modality: N×R×width}, on the CPU. Phase 1 is frozen, so phase 2
    trains on these instead of running the encoders and registers every step."""
    model.eval()
    device = next(model.parameters()).device
    out = {}
    for m in IMAGE_MODALITIES:
        if m in feats and m in model.cfg.modalities:
            n = len(feats[m].pooled)
            out[m] = torch.cat([model.tokens(m, feats[m].batch(np.arange(i, min(i + batch_size, n)), device)).cpu()
                                for i in tqdm(range(0, n, batch_size), desc=f"{m} tokens", leave=False)])
    return out


def fit_captioner(mm: MultimodalLLM, tokens: dict[str, torch.Tensor], captions: list[str],
                  output_dir: str | os.PathLike | None = None, resume: bool = False, callback=None,
                  extra: dict | None = None, overwrite: bool = False, val: tuple | None = None) -> list[dict]:
    """Train the projector (and the decoder, per train_decoder) to write `captions` from `tokens`, by the
    one loop of loop.py. With output_dir: a run folder (checkpoint after every epoch and on Ctrl-C,
    metrics.jsonl), `resume=True` continues it exactly, `overwrite=True` replaces it. `callback(row)`
    sees every metrics row. `val` = (tokens, captions, factors or None) of the validation split: every
    epoch row then gets its numbers (`validation_numbers`), the curve that epochs are chosen on."""
    cfg = mm.llm_cfg
    loop.check_hyperparameters(cfg, "phase-2 config")
    dist = loop.Distributed()  # under torchrun: each rank trains on its share of every batch (DDP), rank 0 writes
    n = len(captions)
    wrong = {m: len(t) for m, t in tokens.items() if len(t) != n}
    if wrong:
        raise ValueError(f"{n} captions but token counts {wrong}; tokens and captions must be row-aligned")
    steps_per_epoch = n // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the training set ({n} captions); "
                         f"use --batch_size {n} or less")
    run = None if output_dir is None else run_folder(output_dir, dist.main)
    with run.exclusive(wait=False) if run else contextlib.nullcontext():  # one trainer per run folder
        if run is not None:
            run.check_start(mm.run_config(extra), resume=resume, overwrite=overwrite, ignore=RESUME_IGNORES)
        if not mm.trained:  # every rank fits the same tokenizer from the same captions; rank 0 saves it
            mm.fit_vocabulary(captions, None if run is None else run.path, resume, save=dist.main)
        longest = max(len(ids) for ids in mm.tokenizer(list(captions), add_special_tokens=False)["input_ids"])
        if cfg.max_new_tokens is None:
            mm.llm_cfg = cfg = dataclasses.replace(cfg, max_new_tokens=math.ceil(1.25 * longest))
        elif cfg.max_new_tokens < longest:
            warnings.warn(f"max_new_tokens {cfg.max_new_tokens} is shorter than the longest training caption ({longest} "
                          f"tokens of {cfg.model_name}'s tokenizer): generated captions that long are cut off and count as "
                          f"wrong. Set max_new_tokens to {longest} or more (--max_new_tokens, or leave it unset: it then "
                          "follows the captions)")
        if run is not None:  # the config as trained, max_new_tokens fixed, so the run captions alike when loaded
            run.start(mm.run_config(extra), resume=resume, overwrite=overwrite, ignore=RESUME_IGNORES)
        if cfg.standardize_tokens and not resume:  # a resumed run loads its own
            for m, projector in mm.projector.items():
                if m in tokens:
                    projector.fit_statistics(tokens[m])
        mm.trained = True
        # some batches leave a projector unused (k = 0 rows, one modality's rows): DDP must not wait for its gradient
        ddp = torch.nn.parallel.DistributedDataParallel(mm, find_unused_parameters=True) if dist.world > 1 else mm
        index_batches = loop.index_batches(n, cfg.batch_size, cfg.seed)
        # a small dataset: each epoch passes over it as often as it takes to train min_steps steps in all (checkpoints and
        # validation stay once an epoch; one pass, as before, wherever epochs x batches reach min_steps)
        passes = max(1, math.ceil(cfg.min_steps / (cfg.epochs * steps_per_epoch)))
        sources = {}  # pass -> every sample's token source, drawn up front so a resumed epoch sees the same

        def batches(epoch):
            return [(epoch * passes + p, index) for p in range(passes) for index in index_batches(epoch * passes + p)]

        def loss_fn(batch):
            draw, index = batch
            if draw not in sources:
                sources.clear()
                sources[draw] = mm.training_keep_masks(n, torch.Generator().manual_seed(cfg.seed * 100_003 + draw))
            index = dist.local_slice(index)
            keep = {m: k[index] for m, k in sources[draw].items()}
            total, counted = ddp({m: t[index] for m, t in tokens.items()}, [captions[i] for i in index], keep)
            return dist.global_mean(total, counted), {}

        epoch_end = None if val is None or not dist.main else lambda epoch: validation_numbers(mm, *val)
        return loop.fit(mm, loss_fn, batches, steps_per_epoch * passes, cfg, run, resume=resume, epoch_end=epoch_end,
                        callback=callback, desc="phase 2 · captioning", rank=dist.rank)


@torch.no_grad()
def validation_numbers(mm: MultimodalLLM, tokens: dict[str, torch.Tensor], captions: list[str],
                       factors: list[dict] | None = None, batch_size: int = 256) -> dict[str, float]:
    """The caption loss from the full token source (teacher-forced; batch means weighted by rows), and with
    SynthTouch factors the attribute accuracy of greedy captions from it, per group: what settings and
    epochs are chosen on."""
    was_training = mm.training
    mm.eval()
    n, total = len(captions), 0.0
    for start in range(0, n, batch_size):
        chunk = {m: t[start:start + batch_size] for m, t in tokens.items()}
        rows = captions[start:start + batch_size]
        total += mm.loss(chunk, rows, mm.keep_masks(mm.source, len(rows))).item() * len(rows)
    out = {"val loss": total / n}
    if factors is not None:
        accuracy = attribute_accuracy(mm.generate_from_tokens(tokens, mm.source), factors)
        out.update({f"val {k}": accuracy[f"{k}"] for k in ("accuracy", *(f"accuracy {g}" for g in evaluate.GROUP_ORDER))})
    mm.train(was_training)
    return out


# What a config.yaml saved before a field existed meant by its absence, where the default is now another: these
# fields came with defaults that kept runs as they were, before configs/phase2.yaml's values became LLMConfig's
BEFORE_FIELD = {"standardize_tokens": False, "length_chunks": 1, "cpu_threads": 0, "min_steps": 0}
RETIRED = ("cache_dir",)  # fields older runs saved that no longer mean anything (built-in decoders live in the run)


def run_folder(path, main: bool = True) -> loop.RunFolder:
    """A phase-2 run folder; its config.yaml is compared field by field, missing fields read as they meant then.
    Beside llm it holds what MultimodalLLM.run_config and run_phase2 add; they are its keys too, so its config.yaml
    reads as a phase-2 run's own and --overwrite may replace the run. `main`: whether this process writes it (rank 0
    of a torchrun job)."""
    return loop.RunFolder(path, main, defaults={"llm": {**LLMConfig().to_dict(), **BEFORE_FIELD, **dict.fromkeys(RETIRED)},
                                                **dict.fromkeys(("decoder_hidden_size", "phase1_run", "phase1_weights"))})


# what may differ when a phase-2 run is resumed: generation settings and where things live; the phase-1 weights'
# identity is `check_phase1_weights`'s (a run saved before it was recorded has none)
RESUME_IGNORES = ("llm.log_every", "llm.max_new_tokens", "llm.local_files_only", "llm.cpu_threads", "phase1_weights")


def check_phase1_weights(run: loop.RunFolder, phase1_run: str | os.PathLike, digest: str):
    """Refuse a phase-2 run whose phase-1 run's weights (sha256 `digest` now) are not the ones it was trained on:
    its projector would read tokens it never saw (the phase-1 run was retrained or replaced since)."""
    saved = run.saved_config().get("phase1_weights") if run.config_path.is_file() else None
    if saved is not None and saved != digest:
        raise ValueError(f"the phase-2 run {run.path} was trained on the phase-1 run {phase1_run} when its weights "
                         f"were sha256 {saved[:16]}…, but they are now {digest[:16]}…: that run was retrained or "
                         "replaced since, and this projector never saw its tokens. Train phase 2 again (--overwrite, or "
                         "a new --output_dir), or restore the phase-1 run's weights")


def train_captioning(mm_model: MultimodalLLM, loader, num_epochs: int | None = None, **fit_kwargs) -> list[dict]:
    """The seed API's phase 2: train the captioner on a DataLoader of (image, caption) batches, such as
    `create_dataloader(ImageTextDataset(...), batch_size)`. The frozen aligner turns the images into phase-1
    tokens once; `fit_captioner` then trains on them for `num_epochs` epochs of the loader's batch size
    (`fit_kwargs`: output_dir, resume, callback). Returns the metrics rows."""
    tokens, captions = [], []
    for batch in tqdm(loader, desc="phase-1 tokens of the training images", leave=False):
        tokens.append(mm_model.image_tokens(core.batch_inputs(batch, "vision"))["vision"].cpu())
        captions += list(core.batch_inputs(batch, "text"))
    check_tokenizer(mm_model.tokenizer, mm_model.decoder.get_input_embeddings().num_embeddings, captions[:16],
                    mm_model.llm_cfg.model_name)
    cfg = mm_model.llm_cfg
    epochs, batch_size = num_epochs or cfg.epochs, min(loader.batch_size or cfg.batch_size, len(captions))
    steps = epochs * (len(captions) // batch_size)
    mm_model.llm_cfg = dataclasses.replace(cfg, epochs=epochs, batch_size=batch_size, min_steps=0,  # epochs as asked
                                           warmup_steps=min(cfg.warmup_steps, steps // 10))
    return fit_captioner(mm_model, {"vision": torch.cat(tokens)}, captions, **fit_kwargs)


# ----------------------------------------------------------------------------------------------
# 6. Evaluation vs k and vs token source, phase 2 end to end, and the command line

def caption_eval_sources(mm: MultimodalLLM, modality_sets=None, ks=None) -> list[TokenSource]:
    """The token sources that `evaluate_captions` captions from: each modality alone and all together (or
    `modality_sets`) at every k of the grid (or `ks`), and no prefix (k = 0) once."""
    source = mm.source
    singles = [(m,) for m in source.modalities] if len(source.modalities) > 1 else []
    modality_sets = modality_sets or singles + [source.modalities]
    ks = prefix_grid(source.k) if ks is None else ks
    return ([TokenSource(source.modalities, 0, source.groups)] if 0 in ks else []) + \
        [TokenSource(tuple(ms), k, source.groups) for ms in modality_sets for k in ks if k > 0]


def evaluate_captions(mm: MultimodalLLM, tokens: dict[str, torch.Tensor], references: list[str],
                      factors: list[dict] | None = None, modality_sets=None, ks=None, n_examples: int = 8) -> dict:
    """Caption metrics for every token source of `caption_eval_sources`. Returns {"rows": [{"modalities", "k",
    metrics..., "examples"}]}; the rows are DataFrame-ready."""
    rows = []
    for source in tqdm(caption_eval_sources(mm, modality_sets, ks), desc="caption eval"):
        captions = mm.generate_from_tokens(tokens, source)
        rows.append({"modalities": "none" if source.k == 0 else "+".join(source.modalities), "k": source.k,
                     **caption_metrics(captions, references, factors),
                     "examples": [{"reference": r, "generated": c}
                                  for r, c in zip(references[:n_examples], captions[:n_examples])]})
    return {"rows": rows}


EVAL_FILES = {"test": "caption_eval.json", "val": "caption_eval_val.json"}  # test: reporting; val: choosing


def eval_file(output_dir: str | os.PathLike, split: str) -> Path:
    """Where a phase-2 run keeps its evaluation on `split`."""
    if split not in EVAL_FILES:
        raise ValueError(f"split must be one of {list(EVAL_FILES)} (val chooses settings, test reports), got {split!r}")
    return Path(output_dir) / EVAL_FILES[split]


def split_factors(dataset) -> list[dict] | None:
    """Every sample's SynthTouch factors; None for datasets without them (real data)."""
    return [dataset.factors_of(i) for i in range(len(dataset))] if hasattr(dataset, "factors_of") else None


def run_phase2(phase1_run: str | os.PathLike, output_dir: str | os.PathLike, llm_cfg: LLMConfig | None = None,
               resume: bool = False, callback=None, overwrite: bool = False, split: str = "test") -> dict:
    """Train phase 2 on a phase-1 run's training split (the validation split's numbers logged after every
    epoch) and evaluate on `split`: "val" to choose settings and epochs, "test" only to report them. Writes
    caption_eval.json (test) or caption_eval_val.json; on SynthTouch every row also holds the linear-probe
    ceiling of its very tokens ("probe accuracy ..." keys, `add_probe_ceiling`)."""
    phase1_run, output_dir, result_file = Path(phase1_run), Path(output_dir), eval_file(output_dir, split)
    llm_cfg = on_phase1_run(llm_cfg or LLMConfig(), phase1_run)
    dist = loop.Distributed()  # under torchrun, before anything goes to a GPU: it picks this rank's device
    phase1_weights = phase1.finished_weights(phase1_run)  # an unfinished run is refused here
    if resume:
        check_phase1_weights(run_folder(output_dir), phase1_run, phase1_weights)
    with at_most_threads(llm_cfg.cpu_threads if phase1.core_device().type == "cpu" else 0):
        aligner = phase1.load_aligner(phase1_run).to(phase1.core_device())
        cfg = phase1.run_config(phase1_run)
        with dist.main_first():  # rank 0 fills a missing feature cache: no two ranks write one cache folder
            train_set, train_feats = phase1.split_data(cfg, "train")
            val_set, val_feats = phase1.split_data(cfg, "val")
        if split == "val" and val_set is None:
            raise ValueError(f"the phase-1 run {phase1_run} has no validation split to evaluate on; use "
                             "split='test' (--split test) or add a val.csv to its dataset")
        train_tokens = encode_tokens(aligner.model, train_feats)
        val = (None if val_set is None else
               (encode_tokens(aligner.model, val_feats), val_set.captions, split_factors(val_set)))
        data.set_seed(llm_cfg.seed)
        mm = MultimodalLLM(aligner, llm_cfg)
        fit_captioner(mm, train_tokens, train_set.captions, output_dir, resume=resume, callback=callback,
                      extra={"phase1_run": phase1.to_run(phase1_run, output_dir), "phase1_weights": phase1_weights},
                      overwrite=overwrite, val=val)
        if dist.world > 1:
            torch.distributed.destroy_process_group()
        if not dist.main:  # rank 0 evaluates and writes; the other ranks of a torchrun job are done
            return {}
        if not resume:  # a replaced run's evaluations are stale, whichever split they were of
            for name in EVAL_FILES.values():
                (output_dir / name).unlink(missing_ok=True)
        if split == "val":
            eval_set, eval_tokens = val_set, val[0]
        else:
            eval_set, eval_feats = phase1.split_data(cfg, "test")
            eval_tokens = encode_tokens(aligner.model, eval_feats)
        factors = split_factors(eval_set)
        sources, fit_ceilings = caption_eval_sources(mm), None
        if factors is not None:  # SynthTouch: beside every row, the linear-probe ceiling of its tokens
            train_factors = split_factors(train_set)
            weights = loop.RunFolder(phase1_run).checkpoint / "model.safetensors"
            cache = CEILINGS.setdefault((str(weights.resolve()), weights.stat().st_mtime_ns, split), {})
            fit_ceilings = functools.partial(probe_ceilings, mm, sources, train_tokens, train_factors, eval_tokens,
                                             factors, cache)
        with ThreadPoolExecutor(1) as beside:
            # the ceilings read phase-1 tokens only: with a spare core their probes (fit in worker processes) run
            # while this process captions, 19 s beside 19 s of notebook 04's 3.5 minutes
            early = beside.submit(fit_ceilings) if fit_ceilings and evaluate.probe_processes() > 1 else None
            result = evaluate_captions(mm, eval_tokens, eval_set.captions, factors)
        if fit_ceilings is not None:
            add_probe_ceiling(result["rows"], sources, early.result() if early else fit_ceilings())
            result["baselines"] = attribute_baselines(train_factors, factors)
        result.update(split=split, phase1_run=str(phase1_run), llm=mm.llm_cfg.to_dict())
        atomic_write(result_file, lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
        return result


def on_phase1_run(llm_cfg: LLMConfig, phase1_run: str | os.PathLike) -> LLMConfig:
    """`llm_cfg` with its token source's modalities, where it leaves them open, those of the phase-1 run's model that
    are images (a vision+text run has no touch tokens to caption from), so its run folder says which it used."""
    if llm_cfg.source.modalities is not None:
        return llm_cfg
    folder = phase1.run_folder(phase1_run)
    has = folder.saved_config()["model"]["modalities"] if folder.config_path.is_file() else IMAGE_MODALITIES
    source = dataclasses.replace(llm_cfg.source, modalities=tuple(m for m in IMAGE_MODALITIES if m in has))
    return dataclasses.replace(llm_cfg, source=source)


def ensure_phase2(phase1_run: str | os.PathLike, output_dir: str | os.PathLike, llm_cfg: LLMConfig,
                  callback=None, split: str = "test") -> dict:
    """The evaluation on `split` of `output_dir` (caption_eval.json for test), training only what is missing:
    a finished run of the same config is reused, an interrupted one resumes, otherwise phase 2 starts.
    Re-running a notebook costs nothing."""
    llm_cfg = on_phase1_run(llm_cfg, phase1_run)
    run = run_folder(output_dir)
    if run.checkpoint is None:
        return run_phase2(phase1_run, output_dir, llm_cfg, callback=callback, split=split)
    check_phase1_weights(run, phase1_run, phase1.finished_weights(phase1_run))
    saved = run.saved_config()
    run.check_same_config({"llm": llm_cfg.to_dict(), "decoder_hidden_size": saved.get("decoder_hidden_size"),
                           "phase1_run": phase1.to_run(phase1_run, output_dir)}, RESUME_IGNORES)
    done = eval_file(run.path, split)
    if done.is_file():
        result = json.loads(done.read_text())
        # max_new_tokens may differ on resume; captions generated with another limit are evaluated again (unset, it is
        # the one the run fixed from its captions)
        if llm_cfg.max_new_tokens in (None, result["llm"]["max_new_tokens"]):
            return result
    return run_phase2(phase1_run, output_dir, llm_cfg, resume=True, callback=callback, split=split)


# ----------------------------------------------------------------------------------------------
# 7. The ceiling beside the result, and statistics over seeds

def source_features(mm: MultimodalLLM, tokens: dict[str, torch.Tensor], source: TokenSource) -> np.ndarray:
    """N×(k·width·modalities): the very tokens the decoder sees from `source`, concatenated (a probe's input)."""
    source = mm.resolve(source)
    index = mm.register_index(source.groups)[:source.k]
    return torch.cat([tokens[m][:, index].flatten(1) for m in source.modalities], 1).float().numpy()


def probe_ceiling(mm: MultimodalLLM, source: TokenSource, fit_tokens: dict[str, torch.Tensor], fit_factors: list[dict],
                  test_tokens: dict[str, torch.Tensor], test_factors: list[dict]) -> dict:
    """What the tokens the decoder sees from `source` know: per caption attribute, the test accuracy of the
    information map's linear probe (`probes.probe("linear")`), fit on `probes.FIT_ROWS` rows of the fit split with
    its regularisation chosen on 500 others of it; keys as attribute_accuracy's. With no tokens (k = 0) a probe
    can only name the fit split's most common value, so the ceiling is the majority baseline."""
    source = mm.resolve(source)
    if source.k == 0:
        return attribute_baselines(fit_factors, test_factors)["majority"]
    order = np.random.default_rng(0).permutation(len(fit_factors))
    rows = dict(fit=order[:probes.FIT_ROWS], select=order[probes.FIT_ROWS:][:500])
    if not len(rows["select"]):  # a fit split of at most FIT_ROWS rows: a fifth of it chooses the regularisation
        rows = dict(fit=order[len(order) // 5:], select=order[:len(order) // 5])
    fit_x, test_x = source_features(mm, fit_tokens, source), source_features(mm, test_tokens, source)
    x = dict(fit=fit_x[rows["fit"]], select=fit_x[rows["select"]], test=test_x)
    codes = {split: [fit_factors[i] for i in index] for split, index in rows.items()} | {"test": test_factors}
    targets = {name: probes.Target(False, {split: np.array([values.index(f[name]) for f in factors])
                                           for split, factors in codes.items()},
                                   {split: np.ones(len(factors), dtype=bool) for split, factors in codes.items()})
               for name, values in data.SynthTouch.FACTORS.items()}
    per_factor = {name: score for name, (score, _) in evaluate.fit_probes([("linear", x, targets)], 1)[0].items()}
    return summarize_accuracy(per_factor)


def probe_ceilings(mm: MultimodalLLM, sources: list[TokenSource], fit_tokens, fit_factors, test_tokens, test_factors,
                   cache: dict | None = None) -> dict:
    """`probe_ceiling` of every source, kept in `cache` (a dict for one phase-1 model and split: the ceiling
    depends on phase 1 alone, so it serves every phase-2 run of that model). Returns the cache."""
    cache = {} if cache is None else cache
    for source in tqdm(sources, desc="probe ceilings", leave=False):
        if source not in cache:
            cache[source] = probe_ceiling(mm, source, fit_tokens, fit_factors, test_tokens, test_factors)
    return cache


def add_probe_ceiling(rows: list[dict], sources: list[TokenSource], ceilings: dict) -> list[dict]:
    """Put beside each row of `evaluate_captions` the probe ceiling of its tokens (`probe_ceilings`), as
    "probe accuracy ..."; `sources`: the rows' token sources, in order (`caption_eval_sources`)."""
    for row, source in zip(rows, sources, strict=True):
        row.update({f"probe {key}": value for key, value in ceilings[source].items()})
    return rows


# probe ceilings already computed in this process, per (phase-1 weights file, its modification time, split)
CEILINGS: dict[tuple, dict] = {}


# What the ablation changes on top of configs/phase2.yaml, one suspect at a time: where information is lost between
# the tokens and the captions (`--seeds 0 --ablation --split val`; chosen on val only).
ABLATIONS = {
    "raw tokens": {"standardize_tokens": False},  # the setting before the validation runs chose whitened tokens
    "channels standardised": {"standardize_tokens": True},  # the setting before whitening (with 60 epochs)
    "decoder 4 layers, width 256": {"model_name": "synthtouch-qwen2-small"},
    "no source mixing": {"mix_sources": False},
    "linear projector": {"projector": "linear"},
    "lr 3e-3": {"lr": 3e-3},  # the setting before the validation ablation chose 1e-3
    "20 epochs": {"epochs": 20},  # the validation runs chose 12 (10 fell short, more costs time)
}


def seed_statistics(phase1_run: str | os.PathLike, output_dir: str | os.PathLike, settings: dict[str, LLMConfig],
                    seeds=(0, 1, 2), split: str = "test") -> pd.DataFrame:
    """Each setting trained once per seed (in output_dir/<setting>/seed<s>; finished runs are reused) and
    evaluated on `split`. One row per (setting, token source): the mean and std over seeds of every
    attribute accuracy and of its probe ceiling, with the majority baseline; written to
    output_dir/phase2_<split>.csv, and the targets of each setting (`target_summary`) to phase2_<split>.json."""
    output_dir = Path(output_dir)
    repeated = sorted({seed for seed in seeds if list(seeds).count(seed) > 1})
    if repeated:  # one run, counted twice, would shrink the std
        raise ValueError(f"seeds {list(seeds)} name {repeated} more than once: a seed trains one run, and a repeated "
                         "one would count twice in the mean ± std; give distinct seeds, e.g. --seeds 0 1 2")
    frames, baselines = [], None
    for name, llm_cfg in settings.items():
        for seed in tqdm(seeds, desc=f"phase 2 · {name} · seeds", leave=False):
            run = output_dir / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") / f"seed{seed}"
            result = ensure_phase2(phase1_run, run, dataclasses.replace(llm_cfg, seed=seed), split=split)
            rows = pd.DataFrame(result["rows"]).drop(columns=["examples", "per adjective"], errors="ignore")
            frames.append(rows.assign(setting=name, seed=seed))
            baselines = result.get("baselines", {}).get("majority", {})  # SynthTouch only
    runs = pd.concat(frames, ignore_index=True)
    numbers = [c for c in runs.columns if c.startswith(("accuracy", "probe accuracy", "caption accuracy"))
               or c in ("bleu4", "cider_d")]
    table = runs.groupby(["setting", "modalities", "k"], sort=False)[numbers].agg(["mean", "std"])
    table.columns = [f"{c} {stat}" for c, stat in table.columns]
    table = table.reset_index().assign(**{f"majority {k}": v for k, v in baselines.items() if k in numbers})
    atomic_write(output_dir / f"phase2_{split}.csv", lambda tmp: table.to_csv(tmp, index=False))
    summary = {name: target_summary(part) if baselines else {}  # the targets are about SynthTouch attributes
               for name, part in table.groupby("setting", sort=False)}
    summary = {"split": split, "seeds": list(seeds), "phase1_run": str(phase1_run), "settings": summary}
    atomic_write(output_dir / f"phase2_{split}.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=1)))
    return table


def target_summary(table: pd.DataFrame) -> dict[str, float]:
    """The numbers the phase-2 targets are stated in, from one setting's rows of `seed_statistics`: from all
    tokens of every modality, each group's mean accuracy, its std over seeds and its share of the probe
    ceiling; at every k, the largest shortfall of the private groups below their ceiling; and the controls
    (no tokens; one modality's tokens) next to the majority baseline of the groups they cannot know."""
    both = max(table.modalities, key=lambda m: (m != "none", m.count("+")))
    full = table[table.modalities == both].sort_values("k")
    last = full.iloc[-1]
    out = {"source": f"{both} k={int(last.k)}", "accuracy": last["accuracy mean"], "accuracy std": last["accuracy std"]}
    for group in evaluate.GROUP_ORDER:
        column = f"accuracy {group}"
        out.update({column: last[f"{column} mean"], f"{column} std": last[f"{column} std"],
                    f"{column} / probe": last[f"{column} mean"] / last[f"probe {column} mean"]})
        if group != "shared":
            gaps = full[full.k > 0][f"probe {column} mean"] - full[full.k > 0][f"{column} mean"]
            out[f"{column} worst shortfall below probe over k"] = float(gaps.max())
    # the controls: what no tokens, or one modality's tokens, say about what they cannot know
    for source, column in (("none", "accuracy"), ("vision", "accuracy touch"), ("touch", "accuracy vision")):
        rows = table[table.modalities == source].sort_values("k")
        if len(rows):
            out[f"control {source}: {column}"] = rows.iloc[-1][f"{column} mean"]
            out[f"control {source}: majority {column}"] = rows.iloc[-1][f"majority {column}"]
    return {k: float(v) if isinstance(v, (float, np.floating)) else v for k, v in out.items()}


FLAGS = {
    "epochs": Flag("epochs", int, "passes over the phase-1 run's training split"),
    "batch_size": Flag("batch_size", int, "captions per step"),
    "lr": Flag("lr", float, "peak learning rate of AdamW (warm-up, then cosine decay)"),
    "seed": Flag("seed", int, "seed of the projector's (and a built-in decoder's) initial weights and the batch order"),
    "model_name": Flag("model_name", str, f"the decoder: a built-in testbed one {tuple(TINY_DECODERS)}, a hub name "
                       "(Qwen/Qwen2.5-1.5B-Instruct) or a local folder"),
    "projector": Flag("projector", str, "phase-1 tokens to decoder embeddings", PROJECTORS),
    "train_decoder": Flag("train_decoder", str, "what of the decoder trains (auto: all of a built-in decoder, none "
                          "of a pretrained one)", DECODER_TRAINING),
    "prompt": Flag("prompt", str, "the user turn after the image tokens"),
    "max_new_tokens": Flag("max_new_tokens", int, "longest caption generated, in the decoder's tokens (None: the "
                           "longest training caption plus a quarter)"),
    "min_steps": Flag("min_steps", int, "a small dataset still trains this many steps: each epoch passes over it as "
                      "often as that takes (0: once)"),
    "k": Flag("source.k", int, "train and caption from at most the first k tokens of each modality (None: all)"),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--phase1_run", required=True, default=argparse.SUPPRESS,
                        help="a phase-1 run folder (train.py's --output_dir)")
    parser.add_argument("--output_dir", required=True, default=argparse.SUPPRESS, help="the phase-2 run folder")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG.relative_to(ROOT), help="phase-2 YAML")
    add_config_flags(parser, FLAGS, load_llm_config(None), str(DEFAULT_CONFIG.relative_to(ROOT)))
    parser.add_argument("--modalities", nargs="+", choices=IMAGE_MODALITIES,
                        help="the modalities whose tokens the decoder reads (config key source.modalities); None: "
                             "every image modality of the phase-1 run")
    parser.add_argument("--resume", action="store_true", help="continue the run in output_dir from its checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in output_dir")
    parser.add_argument("--split", choices=list(EVAL_FILES), default="test",
                        help="evaluate on val (to choose settings and epochs) or test (to report)")
    parser.add_argument("--seeds", type=int, nargs="+",
                        help="train once per seed (output_dir/<setting>/seed<s>) and write mean ± std over seeds to "
                             "output_dir/phase2_<split>.csv and .json")
    parser.add_argument("--ablation", action="store_true",
                        help="with --seeds: every setting of llm_integration.ABLATIONS on top of the config")
    args = parser.parse_args(argv)
    overrides = config_overrides(args, FLAGS)
    config = shipped_or_given(args.config)
    if args.modalities and "source.modalities" in overrides:
        raise SystemExit("--modalities and --set source.modalities both set the token source's modalities: keep one")
    if args.modalities:
        overrides["source.modalities"] = tuple(args.modalities)
    if args.resume and args.overwrite:
        raise SystemExit("--resume continues the run in output_dir and --overwrite replaces it: pass one of them")
    if args.ablation and not args.seeds:
        raise SystemExit("--ablation trains every setting once per seed: add --seeds (e.g. --seeds 0)")
    if args.seeds:
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise SystemExit("--seeds trains its runs one after another in one process, not under torchrun: train each "
                             "seed as a torchrun job of its own (--seed S --output_dir OUT/config/seedS), then run --seeds "
                             "without torchrun on OUT, which reuses those runs")
        if args.resume or args.overwrite:
            raise SystemExit("--seeds reuses finished runs and resumes interrupted ones by itself; drop "
                             "--resume/--overwrite (or choose a new --output_dir)")
        settings = {"config": {}, **(ABLATIONS if args.ablation else {})}
        table = seed_statistics(args.phase1_run, args.output_dir, {
            name: load_llm_config(config, **{**overrides, **changes}) for name, changes in settings.items()},
            args.seeds, args.split)
        print(table.to_string(index=False, float_format="%.3f"))
        print(f"wrote {Path(args.output_dir) / f'phase2_{args.split}.csv'} and .json")
        return
    result = run_phase2(args.phase1_run, args.output_dir, load_llm_config(config, **overrides), args.resume,
                        overwrite=args.overwrite, split=args.split)
    if not result:  # a torchrun rank other than 0
        return
    for row in result["rows"]:
        accuracy = row.get("accuracy", row.get("caption accuracy"))  # attributes (SynthTouch), else exact captions
        print(f"{row['modalities']:>13} k={row['k']:<3} accuracy {accuracy:.3f}  "
              f"BLEU-4 {row['bleu4']:.3f}  CIDEr-D {row['cider_d']:.3f}")
    print(f"wrote {eval_file(args.output_dir, args.split)}")


if __name__ == "__main__":
    main()
