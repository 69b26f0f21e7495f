"""Phase 2's settings (`LLMConfig`, read from configs/phase2.yaml by `load_llm_config`)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import loop
from config import load_dataclass
from text_decoder import TINY_DECODERS
from token_sources import TokenSource


ROOT = Path(__file__).resolve().parent
DEFAULT_CONFIG = ROOT / "configs" / "phase2.yaml"
PROJECTORS = ("linear", "mlp2x_gelu")
DECODER_TRAINING = ("auto", "frozen", "lora", "full")


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
    # the testbed's 2-layer decoder is many small operations, slower on two sleeping (OMP_WAIT_POLICY=PASSIVE, as
    # make sets it) threads than on one; `python bench/profile_phase2.py --phase1_run RUN --threads 1 2` compares
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
