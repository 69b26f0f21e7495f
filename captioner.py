"""The multimodal model, `MultimodalLLM`: a frozen phase-1 aligner, one projector per image modality and a decoder;
prompt assembly, the caption loss, batched KV-cached generation, a saved run read back (`MultimodalLLM.load`)."""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm
from transformers import AutoTokenizer

import alignment
import loop
import phase1
from encoders import check_images
from images import image_batch
from llm_config import LLMConfig
from projector import Projector
from text_decoder import TINY_DECODERS, caption_tokenizer, load_decoder, random_decoder, save_tokenizer, text_nll
from token_sources import IMAGE_MODALITIES, REGISTER_GROUPS, TokenSource, prefix_grid


class MultimodalLLM(nn.Module):
    """`generate([image], prompt=...)`, `generate(touch=[image])` or both → one caption per sample."""

    PREFIX_MARK = "\x00prefix\x00"  # where the prefix goes inside the chat template (never tokenized)
    UNFITTED = 32  # max_new_tokens of a captioner whose config leaves it to the training captions, before it saw any

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
        """Images as `images.image_batch` takes them (file paths and PIL images resized to the encoder's size; 3×S×S
        tensors in [0, 1]) → B×3×S×S."""
        if modality not in self.modalities:
            raise ValueError(f"this model has no {modality} branch; it captions from {self.modalities}")
        size = self.aligner.encoder(modality).cfg.image_size
        images = check_images(image_batch(images, size), modality)
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
        """What config.yaml of a phase-2 run folder holds: the config, the decoder width, the phase-1 model's identity
        in memory (`check_phase1_tensors`) and what `extra` adds (the phase-1 run)."""
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
        run = run_folder(run_dir)
        if not run.config_path.is_file():
            raise FileNotFoundError(f"{run.path} is not a phase-2 run folder (no config.yaml in it); pass the "
                                    "--output_dir of a finished llm_integration.py run, e.g. runs/phase2/default")
        saved = run.saved_config()
        if aligner is None:
            phase1_run = phase1.from_run(saved["phase1_run"], run.path)
            check_phase1_weights(run, phase1_run, phase1.finished_weights(phase1_run))
            aligner = phase1.load_aligner(phase1_run)
        check_phase1_tensors(run, aligner)
        llm = LLMConfig(**{k: v for k, v in saved["llm"].items() if k not in RETIRED})
        tokenizer = run.path / "tokenizer"
        return cls(aligner, llm, tokenizer if tokenizer.is_dir() else None).load_weights(run.path)


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
                                                **dict.fromkeys(("decoder_hidden_size", "phase1_run", "phase1_weights",
                                                                 "phase1_tensors"))})


# what may differ when a phase-2 run is resumed: generation settings and where things live; the phase-1 weights'
# identity is `check_phase1_weights`'s and `check_phase1_tensors`'s (a run saved before they were recorded has none)
RESUME_IGNORES = ("llm.log_every", "llm.max_new_tokens", "llm.local_files_only", "llm.cpu_threads", "phase1_weights",
                  "phase1_tensors")


def check_phase1_tensors(run: loop.RunFolder, aligner: alignment.Aligner):
    """Refuse a phase-1 model in memory (MultimodalLLM.load's `aligner`) whose tensors are not those the phase-2 run
    was trained on. The file's sha256 (`check_phase1_weights`) cannot be compared with weights that have no file,
    so a run records the tensors' own digest too (a run saved before it did is not checked)."""
    saved = run.saved_config().get("phase1_tensors")
    now = loop.tensors_digest(aligner.model.state_dict())
    if saved is not None and saved != now:
        raise ValueError(f"the aligner given to MultimodalLLM.load is not the phase-1 model the phase-2 run {run.path} "
                         f"was trained on: its tensors are sha256 {now[:16]}…, the run recorded {saved[:16]}… "
                         "(another phase-1 run, one retrained since, or a copy changed in memory: cast to another "
                         "dtype, trained further). Pass the one it was trained on (MultimodalLLM.load(RUN) loads "
                         f"its own phase-1 run, {run.saved_config().get('phase1_run')}), or train phase 2 again on "
                         "this one")


def check_phase1_weights(run: loop.RunFolder, phase1_run: str | os.PathLike, digest: str):
    """Refuse a phase-2 run whose phase-1 run's weights (sha256 `digest` now) are not the ones it was trained on:
    its projector would read tokens it never saw (the phase-1 run was retrained or replaced since)."""
    saved = run.saved_config().get("phase1_weights") if run.config_path.is_file() else None
    if saved is not None and saved != digest:
        raise ValueError(f"the phase-2 run {run.path} was trained on the phase-1 run {phase1_run} when its weights "
                         f"were sha256 {saved[:16]}…, but they are now {digest[:16]}…: that run was retrained or "
                         "replaced since, and this projector never saw its tokens. Train phase 2 again (--overwrite, or "
                         "a new --output_dir), or restore the phase-1 run's weights")
