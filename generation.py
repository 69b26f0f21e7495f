"""What a captioner generates from: the phase-1 tokens of images it is given (`image_tokens`, each image checked
against its encoder), and captions generated in batches (`batched_captions`): each batch's prefix and prompt laid
out left-padded, decoded greedily with the KV cache unless the caller asks for beams or sampling."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from encoders import check_images
from images import image_batch
from token_sources import TokenSource

UNFITTED = 32  # max_new_tokens of a captioner whose config leaves it to the training captions, before it saw any


@torch.no_grad()
def batched_captions(mm, tokens: dict[str, torch.Tensor], source: TokenSource, prompt: str | None, batch_size: int,
                     generate_kwargs: dict) -> list[str]:
    """`MultimodalLLM.generate_from_tokens`'s captions of `tokens` ({modality: N×R×width}) from a resolved `source`,
    `batch_size` rows at a time; `generate_kwargs` go to the decoder's `generate`, over greedy KV-cached defaults."""
    n = len(next(iter(tokens.values())))
    kwargs = dict(max_new_tokens=mm.llm_cfg.max_new_tokens or UNFITTED, do_sample=False, num_beams=1,
                  use_cache=True, pad_token_id=mm.tokenizer.pad_token_id, eos_token_id=mm.tokenizer.eos_token_id)
    kwargs.update(generate_kwargs)
    was_training = mm.training
    mm.eval()
    captions = []
    for start in tqdm(range(0, n, batch_size), desc=f"captions ({source.name})", leave=False,
                      disable=n <= batch_size):
        chunk = {m: t[start:start + batch_size] for m, t in tokens.items()}
        prefix, prefix_mask = mm.prefix(chunk, mm.keep_masks(source, len(next(iter(chunk.values())))), source.groups)
        inputs = mm.assemble(prefix, prefix_mask, mm.llm_cfg.prompt if prompt is None else prompt,
                             new_tokens=kwargs["max_new_tokens"])
        inputs.pop("position_ids")  # generate derives them from the attention mask, the same way
        with mm.autocast():
            out = mm.decoder.generate(**inputs, **kwargs)
        captions += [c.strip() for c in mm.tokenizer.batch_decode(out, skip_special_tokens=True)]
    mm.train(was_training)
    return captions


def image_tokens(aligner, modalities: tuple[str, ...], images=None, touch=None) -> dict[str, torch.Tensor]:
    """Phase-1 tokens {modality: B×R×width} of paired vision and/or touch images, for a captioner of `modalities`."""
    given = {m: x for m, x in (("vision", images), ("touch", touch)) if x is not None}
    if not given:
        raise ValueError("pass vision images and/or touch=[...] images")
    tokens = {m: aligner.tokens(m, checked_images(aligner, modalities, m, x)) for m, x in given.items()}
    sizes = {m: len(t) for m, t in tokens.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"vision and touch images are paired, but their counts differ: {sizes}")
    return tokens


def checked_images(aligner, modalities: tuple[str, ...], modality: str, images) -> torch.Tensor:
    """Images as `images.image_batch` takes them (file paths and PIL images resized to the encoder's size; 3×S×S
    tensors in [0, 1]) → B×3×S×S."""
    if modality not in modalities:
        raise ValueError(f"this model has no {modality} branch; it captions from {modalities}")
    size = aligner.encoder(modality).cfg.image_size
    images = check_images(image_batch(images, size), modality)
    if min(images.shape[-2:]) < size:  # larger images are resized by the encoder, as in phase 1
        raise ValueError(f"{modality} images are {tuple(images.shape[-2:])} pixels but the {modality} encoder "
                         f"takes {size}×{size}; resize them (e.g. data.ImageTextDataset(..., image_size={size}))")
    return images
