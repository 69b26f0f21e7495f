"""Phase 2's decoders: the built-in testbed Qwen2 (random init, its byte-level BPE tokenizer fitted offline on the
captions, Qwen's chat format), or a real one by hub name or folder; loading them and checking a tokenizer fits."""
from __future__ import annotations

import math
import os
import shutil
import warnings
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import synthtouch
from encoders import hub_or_cache

# transformers is imported where a decoder or tokenizer is made, not here: train.py and data.py reach this module
# (seed_api.train_captioning): with it, `import train, data, audit, phase1` took 6.9 s instead of 2.8

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
    from transformers import PreTrainedTokenizerFast
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


def random_decoder(tokenizer, seed: int = 0, **architecture):
    """A random-init Qwen2ForCausalLM for `tokenizer`'s vocabulary, the same for the same seed."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
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
    from transformers import AutoModelForCausalLM, AutoTokenizer
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
                         caption_tokenizer(synthtouch.SynthTouch(TOKENIZER_CAPTIONS).captions, PROMPTS[0]))
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


def trainable_decoder(decoder, training: str, lora_r: int, lora_alpha: int):
    """The decoder trainable as `training` says: all of it ("full"), LoRA adapters on its attention ("lora"), or none
    ("frozen")."""
    decoder.requires_grad_(training == "full")
    if training == "lora":
        from peft import LoraConfig, get_peft_model
        decoder = get_peft_model(decoder, LoraConfig(r=lora_r, lora_alpha=lora_alpha, task_type="CAUSAL_LM",
                                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    return decoder


def warn_if_random(decoder, tokenizer, prompt: str, model_name: str, train_decoder):
    """A frozen decoder must already write language. A random one predicts the next token no better than
    uniform guessing (loss about ln V); 0.8 ln V leaves room for chance structure, while a trained model sits
    far below (a few nats for a short prompt)."""
    nll = text_nll(decoder, tokenizer, prompt)
    chance = math.log(decoder.get_input_embeddings().num_embeddings)
    if nll > 0.8 * chance:
        warnings.warn(f"the decoder {model_name!r} predicts its prompt no better than chance ({nll:.2f} "
                      f"nats per token; uniform guessing {chance:.2f}): it looks randomly initialised, and frozen "
                      f"(train_decoder={train_decoder!r}) it can only write garbage. Pass "
                      "train_decoder='full' to train it, or a pretrained decoder", stacklevel=3)


def run_tokenizer(captions: list[str], folder: str | os.PathLike | None, resume: bool, save: bool, prompt: str):
    """A built-in decoder's tokenizer for a phase-2 run: resumed, the one the run saved in <folder>/tokenizer (None
    for a run saved before runs kept theirs); otherwise fitted on `captions` (`caption_tokenizer`) and saved there,
    unless `save` is false (a torchrun rank other than 0)."""
    from transformers import AutoTokenizer
    saved = None if folder is None else Path(folder) / "tokenizer"
    if resume:
        if saved is None or not (saved / "tokenizer.json").is_file():
            return None
        return AutoTokenizer.from_pretrained(saved)
    tokenizer = caption_tokenizer(captions, prompt)
    if saved is not None and save:
        save_tokenizer(tokenizer, saved)
    return tokenizer
