"""The multimodal model, `MultimodalLLM`: a frozen phase-1 aligner, one projector per image modality and a decoder;
prompt assembly, the caption loss, batched KV-cached generation, a saved run read back (`MultimodalLLM.load`)."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn

import alignment
import loop
from decoder_inputs import DecoderInputs
from generation import batched_captions, image_tokens
from llm_config import LLMConfig
from projector import Projector
from phase2_run import saved_run
from text_decoder import TINY_DECODERS, load_decoder, random_decoder, run_tokenizer, trainable_decoder, warn_if_random
from token_sources import IMAGE_MODALITIES, REGISTER_GROUPS, RegisterChoice, TokenSource


class MultimodalLLM(nn.Module):
    """`generate([image], prompt=...)`, `generate(touch=[image])` or both → one caption per sample."""


    def __init__(self, aligner: alignment.Aligner, llm_cfg: LLMConfig | None = None,
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
        self.registers = RegisterChoice(self.modalities, self.n_registers, self.n_shared)
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
        """The decoder, trainable per train_decoder (`trainable_decoder`)."""
        cfg = self.llm_cfg
        self.decoder = trainable_decoder(decoder, cfg.decoder_training, cfg.lora_r, cfg.lora_alpha)
        self.decoder_inputs = DecoderInputs(self.tokenizer, self.decoder)
        if cfg.decoder_training == "frozen":
            warn_if_random(self.decoder, self.tokenizer, cfg.prompt, cfg.model_name, cfg.train_decoder)

    def fit_vocabulary(self, captions: list[str], folder: Path | None = None, resume: bool = False, save: bool = True):
        """Before a built-in decoder's first step: its tokenizer fitted on `captions` (`caption_tokenizer`) and a
        fresh random decoder of that vocabulary in place of the untrained one, so the captions it learns read word by
        word. Saved as <folder>/tokenizer (unless `save` is false: a torchrun rank other than 0); a resumed run gets
        its own back (one saved before runs kept theirs used the SynthTouch tokenizer this model starts with). Other
        decoders keep their tokenizer."""
        if self.llm_cfg.model_name not in TINY_DECODERS:
            return
        tokenizer = run_tokenizer(captions, folder, resume, save, self.llm_cfg.prompt)
        if tokenizer is not None:
            self.tokenizer = tokenizer
            decoder = random_decoder(tokenizer, self.llm_cfg.seed, **TINY_DECODERS[self.llm_cfg.model_name])
            self.attach_decoder(decoder.to(self.device))

    def train(self, mode: bool = True):
        super().train(mode)
        self.aligner.eval()  # phase 1 is frozen, dropout included
        if self.llm_cfg.decoder_training == "frozen":
            self.decoder.eval()
        return self

    # --- which tokens

    def register_index(self, groups) -> list[int]:
        return self.registers.register_index(groups)

    def resolve(self, source: TokenSource | None) -> TokenSource:
        """The source (the configured one when None) with its defaults filled in, checked against this model."""
        return self.registers.resolve(source or self.llm_cfg.source)

    def keep_masks(self, source: TokenSource, batch: int) -> dict[str, torch.Tensor]:
        return self.registers.keep_masks(source, batch)

    def training_keep_masks(self, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Per sample: one modality or all of them, and k from prefix_grid (see LLMConfig.mix_sources)."""
        return self.registers.training_keep_masks(self.source, self.llm_cfg.mix_sources, batch, generator)

    def image_tokens(self, images=None, touch=None) -> dict[str, torch.Tensor]:
        """Phase-1 tokens {modality: B×R×width} of paired vision and/or touch images (`generation.image_tokens`)."""
        return image_tokens(self.aligner, self.modalities, images, touch)

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
        return self.decoder_inputs.prompt_ids(prompt)

    def assemble(self, prefix: torch.Tensor, prefix_mask: torch.Tensor, prompt: str, captions=None,
                 new_tokens: int = 0) -> dict[str, torch.Tensor]:
        """[template head | prefix | prompt, template tail | caption, EOS] → left-padded decoder inputs
        (`DecoderInputs.assemble`)."""
        return self.decoder_inputs.assemble(prefix, prefix_mask, prompt, captions, new_tokens)

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
        return batched_captions(self, tokens, source, prompt, batch_size, generate_kwargs)

    # --- checkpoints: safetensors + config.yaml, each written atomically

    def fitted_tensors(self) -> dict[str, torch.Tensor]:
        """The projectors' token statistics (standardize_tokens): fit to the training split, then fixed."""
        return {f"projector.{name}": value for name, value in self.projector.named_buffers()}

    def trainable_decoder_state(self) -> dict[str, torch.Tensor]:
        """The decoder tensors that train: all for `full`, the adapters for `lora`, none when frozen."""
        return {n: p for n, p in self.decoder.named_parameters() if p.requires_grad}

    def run_config(self, extra: dict | None = None) -> dict:
        """What config.yaml of a phase-2 run folder holds: the config, the decoder width, the phase-1 model's identity
        in memory (`phase2_run.check_phase1_tensors`) and what `extra` adds (the phase-1 run)."""
        return {"llm": self.llm_cfg.to_dict(), "decoder_hidden_size": self.hidden,
                "phase1_tensors": loop.tensors_digest(self.aligner.model.state_dict()), **(extra or {})}

    def load_weights(self, run_dir: str | os.PathLike) -> "MultimodalLLM":
        run = loop.RunFolder(run_dir)
        saved = run.saved_config()
        if saved["decoder_hidden_size"] != self.hidden:
            raise ValueError(f"the projector in {run.path} outputs width {saved['decoder_hidden_size']} (for "
                             f"{saved['llm']['model_name']}) but this decoder ({self.llm_cfg.model_name}) has hidden "
                             f"size {self.hidden}; load it with the decoder it was trained for, or train a new one")
        loop.load_trainable(self, run.load_weights(), run)
        self.trained = True
        return self

    @classmethod
    def load(cls, run_dir: str | os.PathLike, aligner: alignment.Aligner | None = None) -> "MultimodalLLM":
        """A trained phase-2 model from its run folder, on `aligner` (default: its phase-1 run's), from any working
        directory: the phase-1 run is found relative to this one, as config.yaml keeps it."""
        run, llm, aligner = saved_run(run_dir, aligner)
        tokenizer = run.path / "tokenizer"
        return cls(aligner, llm, tokenizer if tokenizer.is_dir() else None).load_weights(run.path)
