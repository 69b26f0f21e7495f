"""Phase 2: token sources, decoder inputs and labels, generation, training, checkpoints, metrics, the
seed package's quick start and the command line, on a random tiny aligner and a micro Qwen2 decoder."""
import json
import math
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import data
import llm_integration as L
import phase1
import phase2
import train
from captions import attribute_accuracy, attribute_baselines, bleu4, cider_d
from conftest import make_mm, micro_decoder

def random_tokens(n, width=32, registers=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(n, registers, width, generator=g) for m in ("vision", "touch")}


# ----------------------------------------------------------------------------------------------
# metrics (the COCO caption toolkit's) against hand-computed cases

def test_bleu4_matches_hand_computation():
    # precisions 4/5, 3/4, 2/3, 1/2; equal lengths → no brevity penalty
    assert bleu4(["a b c d e"], ["a b c d f"]) == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)
    # every n-gram matches but the candidate is 4 words against 6: brevity penalty exp(1 - 6/4)
    assert bleu4(["a b c d"], [["a b c d e f"]]) == pytest.approx(math.exp(-0.5))
    # the COCO toolkit adds 1e-15 to every match count, so no overlap at all scores ~1e-16 rather than 0
    assert bleu4(["x y z w"], ["a b c d"]) < 1e-12


def test_cider_d_matches_hand_computation():
    # two images, every n-gram in one reference set: idf = log 2 for all; identical uni- and bigrams
    # give cosine 1 for n=1,2 (no 3-, 4-grams): 10 * (1 + 1) / 4 = 5
    assert cider_d(["a b", "c d"], ["a b", "c d"]) == pytest.approx(5.0)
    # second image: "c e" vs "c d": unigram cosine 1/2, no bigram → 10 * 0.5 / 4 = 1.25; mean with 5
    assert cider_d(["a b", "c e"], ["a b", "c d"]) == pytest.approx((5.0 + 1.25) / 2)
    # a candidate 3 words longer than its reference loses the Gaussian length penalty exp(-9 / 72)
    long = cider_d(["a b x y z", "c d"], ["a b", "c d"])
    assert long == pytest.approx((10 * (2 / math.sqrt(10) + 1 / 2) / 4 * math.exp(-9 / 72) + 5.0) / 2)


def test_attribute_accuracy_per_factor_group_and_baselines():
    dataset = data.SynthTouch(2, split="test")
    factors = [dataset.factors_of(i) for i in range(2)]
    wrong = dict(factors[1], color=next(c for c in data.SynthTouch.FACTORS["color"] if c != factors[1]["color"]))
    captions = [data.SynthTouch.caption_of(factors[0]), data.SynthTouch.caption_of(wrong)]
    acc = attribute_accuracy(captions, factors)
    assert acc["accuracy color"] == 0.5 and acc["accuracy hardness"] == 1.0
    assert acc["accuracy vision"] == pytest.approx((0.5 + 1.0) / 2)
    assert acc["accuracy shared"] == acc["accuracy touch"] == 1.0
    assert acc["accuracy"] == pytest.approx(6.5 / 7)
    assert attribute_accuracy(["a surface"] * 2, factors)["accuracy"] == 0.0  # missing attributes are wrong
    train_factors = [dict(factors[0], pressure="firm")] * 3 + [dict(factors[0], pressure="light")]
    base = attribute_baselines(train_factors, factors)
    assert base["majority"]["accuracy pressure"] == pytest.approx(sum(f["pressure"] == "firm" for f in factors) / 2)
    assert base["chance"]["accuracy hardness"] == pytest.approx(1 / 3)
    assert base["chance"]["accuracy touch"] == pytest.approx((1 / 3 + 1 / 2) / 2)


# ----------------------------------------------------------------------------------------------
# token sources and decoder inputs

def test_token_sources_pick_the_first_k_of_chosen_modalities_and_groups(aligner, decoder_dir):
    mm = make_mm(aligner, decoder_dir)
    assert mm.source == L.TokenSource(("vision", "touch"), 8, L.REGISTER_GROUPS)
    assert mm.register_index(("private",)) == list(range(2, 8))
    keep = mm.keep_masks(mm.resolve(L.TokenSource(("touch",), 3)), batch=2)
    assert keep["vision"].sum() == 0 and keep["touch"][0].tolist() == [True] * 3 + [False] * 5
    prefix, mask = mm.prefix(random_tokens(2), keep)
    assert prefix.shape == (2, 8, 32) and mask.sum() == 6  # only the touch projector ran
    empty, _ = mm.prefix(random_tokens(2), mm.keep_masks(mm.resolve(L.TokenSource(k=0)), 2))
    assert empty.shape == (2, 0, 32)  # the k = 0 control
    with pytest.raises(ValueError, match="hold only 6 tokens"):
        mm.resolve(L.TokenSource(k=7, groups=("private",)))
    draws = mm.training_keep_masks(400, torch.Generator().manual_seed(0))
    per_sample = torch.stack([draws["vision"].sum(1), draws["touch"].sum(1)], 1)
    assert {0, 1, 2, 4, 8} == set(per_sample.max(1).values.tolist())  # every k of the grid, 0 included
    assert (per_sample[:, 0] == 0).any() and (per_sample[:, 1] == 0).any() and (per_sample.min(1).values > 0).any()
    assert torch.equal(draws["touch"], mm.training_keep_masks(400, torch.Generator().manual_seed(0))["touch"])


def test_labels_cover_only_caption_and_eos_even_when_pad_is_eos(aligner, tmp_path):
    folder = micro_decoder(tmp_path / "pad_eos", pad_is_eos=True, chat_template=False)
    mm = make_mm(aligner, folder)
    tok = mm.tokenizer
    assert tok.pad_token_id == tok.eos_token_id and not tok.chat_template
    captions = ["red, soft", "striped, horizontal, coarse, blue, dim, hard, firm"]
    keep = mm.keep_masks(mm.resolve(L.TokenSource(k=2)), 2)
    keep["touch"] = keep["touch"] & torch.tensor([[False], [True]])  # row 0 has a shorter prefix
    prefix, prefix_mask = mm.prefix(random_tokens(2), keep)
    inputs = mm.assemble(prefix, prefix_mask, "Describe this image:", captions)
    labels, mask = inputs["labels"], inputs["attention_mask"].bool()
    prompt_len = len(tok("Describe this image:", add_special_tokens=False).input_ids)
    for row, caption in enumerate(captions):
        expected = tok(caption, add_special_tokens=False).input_ids + [tok.eos_token_id]
        assert labels[row][labels[row] != -100].tolist() == expected  # caption + EOS, nothing else
        assert labels[row][-1] == tok.eos_token_id  # EOS learned although it is also the pad id
        assert mask[row].sum() == (2 if row == 0 else 4) + prompt_len + len(expected)
    assert not mask[0, 0] and mask[:, -1].all()  # left-padded: padding first, real tokens last
    assert (inputs["position_ids"][mask] >= 0).all() and inputs["position_ids"][0][mask[0]][0] == 0


def test_chat_template_wraps_the_prefix_in_the_user_turn(aligner, decoder_dir):
    mm = make_mm(aligner, decoder_dir)
    before, after = mm.prompt_ids("Describe this image:")
    assert mm.tokenizer.decode(before) == "<|im_start|>user\n"
    assert mm.tokenizer.decode(after) == "Describe this image:<|im_end|>\n<|im_start|>assistant\n"


def test_left_padding_leaves_each_rows_logits_unchanged(aligner, decoder_dir):
    mm = make_mm(aligner, decoder_dir).eval()
    tokens, captions = random_tokens(2), ["red, soft", "striped, horizontal, coarse, blue, dim, hard, firm"]
    keep = mm.keep_masks(mm.source, 2)
    keep["vision"] = keep["vision"] & torch.tensor([[False], [True]])

    def caption_logits(rows):
        inputs = mm.assemble(*mm.prefix({m: t[rows] for m, t in tokens.items()}, {m: k[rows] for m, k in keep.items()}),
                             "Describe this image:", [captions[i] for i in rows])
        logits = mm.decoder(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        return [logits[i][inputs["labels"][i] != -100] for i in range(len(rows))]

    batched = caption_logits([0, 1])
    for row in (0, 1):
        torch.testing.assert_close(batched[row], caption_logits([row])[0], atol=1e-4, rtol=1e-4)


def test_length_chunks_give_the_same_loss_and_gradient_from_fewer_positions(aligner, decoder_dir):
    tokens, captions = random_tokens(12), ["red, soft", "striped, horizontal, coarse, blue, dim, hard, firm"] * 6
    losses, grads = {}, {}
    for chunks in (1, 3):
        mm = make_mm(aligner, decoder_dir, train_decoder="full", length_chunks=chunks)  # same seed: same weights
        keep = mm.training_keep_masks(12, torch.Generator().manual_seed(0))  # mixed sources: rows differ in length
        losses[chunks] = mm.loss(tokens, captions, keep)
        losses[chunks].backward()
        grads[chunks] = torch.cat([p.grad.flatten() for p in mm.parameters() if p.grad is not None])
    # the same sums of float32 products in other groupings: relative differences of a few float32 epsilons per
    # layer; the tolerances (1e-5 on the loss, 1e-4 relative on gradients) sit well above that and far below
    # any real difference (a chunk's mean taken unweighted instead of per caption token would be off by ~1e-1)
    torch.testing.assert_close(losses[3], losses[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[3], grads[1], rtol=1e-4, atol=1e-6)
    # and the loss is the decoder's own (transformers' cross-entropy over every position, labels shifted), which
    # `loss` reproduces from the caption positions' logits only; same products, same tolerance
    inputs = mm.assemble(*mm.prefix(tokens, keep, mm.source.groups), mm.llm_cfg.prompt, captions)
    torch.testing.assert_close(losses[3], mm.decoder(**inputs).loss, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="length_chunks=0 must be at least 1"):
        L.LLMConfig(length_chunks=0)


# ----------------------------------------------------------------------------------------------
# generation

def test_generation_is_batched_and_cached_without_changing_greedy_output(aligner, decoder_dir):
    mm = make_mm(aligner, decoder_dir)
    tokens = random_tokens(5)
    batched = mm.generate_from_tokens(tokens, max_new_tokens=8)
    assert batched == [c for i in range(5) for c in
                       mm.generate_from_tokens({m: t[i:i + 1] for m, t in tokens.items()}, max_new_tokens=8)]
    assert batched == mm.generate_from_tokens(tokens, max_new_tokens=8, use_cache=False, batch_size=2)
    beams = mm.generate_from_tokens(tokens, max_new_tokens=8, num_beams=3)
    torch.manual_seed(0)
    sampled = mm.generate_from_tokens(tokens, max_new_tokens=8, do_sample=True, temperature=5.0)
    assert len(beams) == len(sampled) == 5 and sampled != batched


def test_generate_from_vision_touch_and_both(aligner, decoder_dir):
    mm = make_mm(aligner, decoder_dir, max_new_tokens=4)
    items = [data.SynthTouch(3, split="test")[i] for i in range(3)]
    vision, touch = [x["vision"] for x in items], [x["touch"] for x in items]
    for captions in (mm.generate(vision[:1], prompt="Describe this image:"), mm.generate(touch=touch[:1]),
                     mm.generate(vision[:1], touch=touch[:1], k=1)):
        assert isinstance(captions, list) and len(captions) == 1 and isinstance(captions[0], str)
    assert len(mm.generate(torch.stack(vision), touch=touch)) == 3


def test_bad_inputs_fail_with_clear_errors(aligner, decoder_dir, tmp_path):
    mm = make_mm(aligner, decoder_dir, max_new_tokens=4)
    image = data.SynthTouch(1)[0]["vision"]
    with pytest.raises(ValueError, match="image list is empty"):
        mm.generate([])
    with pytest.raises(ValueError, match="encoder takes 64×64"):
        mm.generate([image[:, :32, :32]])
    with pytest.raises(ValueError, match="3×H×W"):
        mm.generate([image[:1]])
    with pytest.raises(ValueError, match="counts differ"):
        mm.generate([image, image], touch=[image])
    with pytest.raises(ValueError, match="exceed the decoder's context of 128"):
        mm.generate([image], prompt="Describe this image: " * 40)
    mm.projector["vision"] = L.Projector("linear", 32, 48, 8)
    with pytest.raises(ValueError, match="projector outputs width 48 but the decoder's hidden size is 32"):
        mm.generate([image])
    mm.projector["vision"] = L.Projector("linear", 16, 32, 8)
    with pytest.raises(ValueError, match="tokens are 32 wide but the vision projector takes 16"):
        mm.generate([image])
    with pytest.raises(ValueError, match="no pad token"):
        make_mm(aligner, micro_decoder(tmp_path / "no_pad", pad=False))
    with pytest.raises(OSError, match="cannot load the decoder 'Qwen/Qwen2.5-0.5B-Instruct'.*local folder"):
        make_mm(aligner, "Qwen/Qwen2.5-0.5B-Instruct", local_files_only=True)
    with pytest.raises(ValueError, match="unknown projector"):
        L.LLMConfig(projector="mlp3x")
    with pytest.raises(ValueError, match="standardize_tokens='channels' is not a choice: use true"):
        L.LLMConfig(standardize_tokens="channels")


# ----------------------------------------------------------------------------------------------
# training and checkpoints

def two_class_data(n=64):
    """Tokens whose sign says which of two captions is right, so only a decoder that reads the prefix
    can caption them."""
    label = torch.arange(n) % 2
    tokens = {m: t + 3.0 * (2 * label[:, None, None] - 1) for m, t in random_tokens(n).items()}
    captions = ["striped, horizontal, fine, red, dim, soft, gentle",
                "dotted, vertical, coarse, blue, bright, hard, firm"]
    return tokens, [captions[i] for i in label.tolist()], captions


def test_full_training_reads_the_prefix_and_k0_cannot(aligner, decoder_dir):
    tokens, targets, captions = two_class_data()
    mm = make_mm(aligner, decoder_dir, train_decoder="full", epochs=40, batch_size=16, lr=1e-2, warmup_steps=10,
                 mix_sources=False, max_new_tokens=40)
    L.fit_captioner(mm, tokens, targets)
    few = {m: t[:4] for m, t in tokens.items()}
    assert mm.generate_from_tokens(few) == targets[:4]
    blind = mm.generate_from_tokens(few, L.TokenSource(k=0))
    assert len(set(blind)) == 1  # without a prefix every sample gets the same caption


def test_frozen_decoder_by_default_and_lora_on_request(aligner, decoder_dir, tmp_path):
    tokens, targets, _ = two_class_data(32)
    mm = make_mm(aligner, decoder_dir, epochs=1, batch_size=16)
    assert mm.llm_cfg.decoder_training == "frozen" and not mm.trainable_decoder_state()
    before = {k: v.clone() for k, v in mm.decoder.state_dict().items()}
    projector = {k: v.clone() for k, v in mm.projector.state_dict().items()}
    L.fit_captioner(mm, tokens, targets)
    assert all(torch.equal(before[k], v) for k, v in mm.decoder.state_dict().items())
    assert any(not torch.equal(projector[k], v) for k, v in mm.projector.state_dict().items())

    lora = make_mm(aligner, decoder_dir, train_decoder="lora", lora_r=4, epochs=1, batch_size=16, max_new_tokens=6)
    trained = lora.trainable_decoder_state()
    assert trained and all("lora_" in name for name in trained)
    L.fit_captioner(lora, tokens, targets, tmp_path / "lora")
    assert any(p.abs().sum() > 0 for n, p in trained.items() if "lora_B" in n)  # B starts at zero
    reloaded = L.MultimodalLLM.load(tmp_path / "lora", aligner)
    assert reloaded.generate_from_tokens(tokens) == lora.generate_from_tokens(tokens)


def test_a_finished_run_is_replaced_with_overwrite_only(aligner, decoder_dir, tmp_path):
    tokens, targets, _ = two_class_data(32)
    where = dict(output_dir=tmp_path / "run", extra={"phase1_run": "../phase1"})  # as run_phase2 saves it
    L.fit_captioner(make_mm(aligner, decoder_dir, epochs=1, batch_size=16), tokens, targets, **where)
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        L.fit_captioner(make_mm(aligner, decoder_dir, epochs=1, batch_size=16, seed=1), tokens, targets, **where)
    L.fit_captioner(make_mm(aligner, decoder_dir, epochs=1, batch_size=16, seed=1), tokens, targets, **where,
                    overwrite=True)
    assert L.run_folder(tmp_path / "run").saved_config()["llm"]["seed"] == 1


def test_checkpoints_are_atomic_and_an_interrupted_run_resumes_exactly(aligner, decoder_dir, tmp_path):
    tokens, targets, _ = two_class_data(32)
    settings = dict(train_decoder="full", epochs=2, batch_size=16, warmup_steps=2, log_every=1)
    straight = make_mm(aligner, decoder_dir, **settings)
    L.fit_captioner(straight, tokens, targets, tmp_path / "straight")

    def interrupt(row):  # Ctrl-C after step 3 of 4, in the middle of the second epoch
        if row["kind"] == "step" and row["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        L.fit_captioner(make_mm(aligner, decoder_dir, **settings), tokens, targets, tmp_path / "resumed",
                           callback=interrupt)
    resumed = make_mm(aligner, decoder_dir, **settings)
    rows = L.fit_captioner(resumed, tokens, targets, tmp_path / "resumed", resume=True)
    assert [r["step"] for r in rows if r["kind"] == "step"] == [4]
    for a, b in ((straight.projector, resumed.projector), (straight.decoder, resumed.decoder)):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(x, y, msg=name)
    files = sorted(p.name for p in (tmp_path / "resumed").iterdir())  # no temporary files left behind
    assert files == ["checkpoint", "checkpoint-00000004", "config.yaml", "metrics.jsonl", "tensorboard"]
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoint").iterdir()) == ["model.safetensors", "state.pt"]
    with pytest.raises(ValueError, match="cannot resume .* another config"):
        L.fit_captioner(make_mm(aligner, decoder_dir, **dict(settings, batch_size=8)), tokens, targets,
                           tmp_path / "resumed", resume=True)


def test_standardised_tokens_reach_the_decoder_at_unit_scale_and_travel_with_the_checkpoint(aligner, decoder_dir,
                                                                                           tmp_path):
    tokens, targets, _ = two_class_data(32)
    # channels whose scales span 1e-2..1e2 around offsets of up to 10 (configs/phase2.yaml: what the shared tokens
    # leak lies in small-variance channels); the label's ±3 sits on every channel, so it is read either way
    scale = 10.0 ** torch.linspace(-2, 2, 32)
    tokens = {m: t * scale + torch.linspace(-10, 10, 32) for m, t in tokens.items()}
    settings = dict(standardize_tokens=True, train_decoder="full", epochs=2, batch_size=16, warmup_steps=2, lr=1e-3)
    mm = make_mm(aligner, decoder_dir, **settings)
    projector = mm.projector["vision"]
    projector.fit_statistics(tokens["vision"])
    seen = (tokens["vision"] - projector.shift) * projector.scale  # what the projector's first layer reads
    # float32 rounding of (x − mean) · (1 / std): ~1e-7 relative to |x| / std, at most 1e3 here (offset 10,
    # std 1e-2 · 3), so 1e-3 bounds it with room; torch.std is the unbiased one, so the std comes out 1
    torch.testing.assert_close(seen.mean(0), torch.zeros_like(seen[0]), atol=1e-3, rtol=0)
    torch.testing.assert_close(seen.std(0), torch.ones_like(seen[0]), atol=1e-3, rtol=1e-3)

    # training fits them from the training tokens and keeps them fixed (the optimizer never sees them), and a
    # reloaded run uses its own; the mean of 32 float32 values of up to 10 is exact to ~1e-6, 1e-5 bounds it
    trained = make_mm(aligner, decoder_dir, **settings)
    L.fit_captioner(trained, tokens, targets, tmp_path / "run")
    torch.testing.assert_close(trained.projector["touch"].shift, tokens["touch"].mean(0), atol=1e-5, rtol=0)
    reloaded = L.MultimodalLLM.load(tmp_path / "run", aligner)
    for name, value in trained.projector.state_dict().items():
        assert torch.equal(value, reloaded.projector.state_dict()[name]), name
    assert reloaded.generate_from_tokens(tokens) == trained.generate_from_tokens(tokens)


def test_whitened_tokens_reach_the_decoder_decorrelated_and_travel_with_the_checkpoint(aligner, decoder_dir, tmp_path):
    tokens, targets, _ = two_class_data(32)
    # every register's 32 channels mixed by a random rotation of scales 1e-2..1e2: per channel they look alike,
    # the small directions hide in combinations of channels (what per-channel standardisation cannot undo)
    rotation = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(1)))[0]
    mixing = rotation * 10.0 ** torch.linspace(-2, 2, 32)
    tokens = {m: t @ mixing.T + 5.0 for m, t in tokens.items()}
    settings = dict(standardize_tokens="whiten", train_decoder="full", epochs=2, batch_size=16, warmup_steps=2, lr=1e-3)
    projector = make_mm(aligner, decoder_dir, **settings).projector["vision"]
    projector.fit_statistics(tokens["vision"])
    seen = torch.einsum("nrd,rde->nre", tokens["vision"] - projector.shift, projector.scale).double()
    for register in range(seen.shape[1]):
        x = tokens["vision"][:, register].double()
        variances = torch.linalg.eigvalsh(torch.cov(x.T))
        after = torch.linalg.eigvalsh(torch.cov(seen[:, register].T))
        # ZCA keeps the eigenvectors and maps variance λ to λ / (λ + floor · mean λ): the floor is the only
        # thing between the result and the identity. float32 rounding of the product (sums of 32 terms of
        # ~1e-7 relative error, on inputs up to 1e2 / 1e-2 the whitened scale) stays far below 1e-3
        expected = variances / (variances + L.WHITENING_FLOOR * variances.mean())
        torch.testing.assert_close(after, expected, atol=1e-3, rtol=1e-3)
        assert (after[variances >= variances.mean()] > 1 / (1 + L.WHITENING_FLOOR) - 1e-3).all()

    # fixed through training (AdamW's steps would undo a whitening matrix), saved with the run, and a reloaded
    # run reads its tokens the same way
    trained = make_mm(aligner, decoder_dir, **settings)
    fitted = make_mm(aligner, decoder_dir, **settings).projector["touch"]
    fitted.fit_statistics(tokens["touch"])
    L.fit_captioner(trained, tokens, targets, tmp_path / "run")
    assert torch.equal(trained.projector["touch"].scale, fitted.scale)
    reloaded = L.MultimodalLLM.load(tmp_path / "run", aligner)
    for name, value in trained.projector.state_dict().items():
        assert torch.equal(value, reloaded.projector.state_dict()[name]), name
    assert reloaded.generate_from_tokens(tokens) == trained.generate_from_tokens(tokens)


def factor_tokens(n, seed=0):
    """n SynthTouch samples' factors and captions, and tokens that hold two factors: vision token 0 the
    colour, touch token 1 the hardness (one-hot, 6 units on a random background the same for every sample,
    so that nothing else in a token tells samples apart and a decoder cannot memorise captions by it)."""
    dataset = data.SynthTouch(n, seed=seed)
    factors = [dataset.factors_of(i) for i in range(n)]
    tokens = {m: t.repeat(n, 1, 1) for m, t in random_tokens(1).items()}
    for name, modality, slot in (("color", "vision", 0), ("hardness", "touch", 1)):
        values = data.SynthTouch.FACTORS[name]
        codes = torch.tensor([values.index(f[name]) for f in factors])
        tokens[modality][:, slot, :len(values)] += 6.0 * F.one_hot(codes, len(values))
    return tokens, factors, dataset.captions


# A guess that ignores the input scores the rate of the value it names: between 1/|values| and the majority
# rate, which differ by a few points here; sampling noise on 200 held-out rows adds std <= 0.035. A token
# that leaks the factor scores ~1 instead. So "at the baseline" is |accuracy - majority| < 0.12.
AT_BASELINE = 0.12


def test_probe_ceiling_reads_exactly_the_tokens_the_decoder_sees(aligner, decoder_dir):
    mm = make_mm(aligner, decoder_dir)
    fit, fit_factors, _ = factor_tokens(400)
    test, test_factors, _ = factor_tokens(200, seed=1)
    majority = attribute_baselines(fit_factors, test_factors)["majority"]

    def ceiling(modalities, k):
        return L.probe_ceiling(mm, L.TokenSource(modalities, k), fit, fit_factors, test, test_factors)

    assert ceiling(None, 0) == majority  # no tokens: a probe can only name the most common value
    assert ceiling(("touch",), 2)["accuracy hardness"] > 0.95  # token 1 is among the first 2 ...
    for modalities, k, name in ((("touch",), 1, "hardness"), (("vision",), 8, "hardness"), (("touch",), 8, "color")):
        assert abs(ceiling(modalities, k)[f"accuracy {name}"] - majority[f"accuracy {name}"]) < AT_BASELINE
    both = ceiling(("vision", "touch"), 4)  # ... not the first 1; both modalities' tokens are read together
    assert both["accuracy color"] > 0.95 and both["accuracy hardness"] > 0.95
    assert L.source_features(mm, test, L.TokenSource(("vision", "touch"), 4)).shape == (200, 2 * 4 * 32)


def test_captions_name_only_what_their_tokens_can_know(aligner, decoder_dir):
    tokens, factors, captions = factor_tokens(320)
    held, held_factors, _ = factor_tokens(200, seed=1)
    mm = make_mm(aligner, decoder_dir, train_decoder="full", epochs=40, batch_size=32, lr=1e-2, warmup_steps=10,
                 max_new_tokens=30)
    L.fit_captioner(mm, tokens, captions)
    majority = attribute_baselines(factors, held_factors)["majority"]

    def accuracy(modalities, k=None):
        return attribute_accuracy(mm.generate_from_tokens(held, L.TokenSource(modalities, k)), held_factors)

    # the vision token that knows the colour is read: far above what no information gives (the micro decoder
    # does not learn to read the touch token's hardness in this budget, so only the colour is asserted here)
    assert accuracy(("vision", "touch"))["accuracy color"] > majority["accuracy color"] + 0.3
    for modalities, k, unknown in ((None, 0, ("color", "hardness")), (("vision",), None, ("hardness",)),
                                   (("touch",), None, ("color",))):
        got = accuracy(modalities, k)
        for name in unknown:  # a caption may only name what its tokens can know
            assert abs(got[f"accuracy {name}"] - majority[f"accuracy {name}"]) < AT_BASELINE, (modalities, name)


# ----------------------------------------------------------------------------------------------
# the seed package's quick start and the command line

def test_seed_quick_start_runs_as_written():
    from core import AlignmentConfig, VisionTextAligner
    from data import ImageTextDataset, create_dataloader, get_device, set_seed
    from llm_integration import LLMConfig, MultimodalLLM
    from train import train_alignment

    config = AlignmentConfig(vision_model_name="synth-vision", text_model_name="all-MiniLM-L6-v2", d_align=64,
                             hidden_dim=64, batch_size=8, num_epochs=1)
    device = get_device()
    set_seed(42)
    model = VisionTextAligner(config).to(device)
    synth = data.SynthTouch(16)
    dataset = ImageTextDataset([synth[i]["vision"] for i in range(16)], synth.captions, image_size=64)
    loader = create_dataloader(dataset, batch_size=config.batch_size)
    history = train_alignment(model, loader, num_epochs=config.num_epochs)
    assert len(history["loss"]) == 1 and math.isfinite(history["loss"][0])

    llm_config = LLMConfig(model_name="synthtouch-qwen2-tiny", max_new_tokens=6)
    mm_model = MultimodalLLM(model, llm_config)
    image = dataset[0]["image"]
    caption = mm_model.generate([image], prompt="Describe this image:")
    assert isinstance(caption, list) and len(caption) == 1 and isinstance(caption[0], str)


ENGLISH = ["a wooden chair stands beside the window", "two children play football in the park",
           "an old bicycle leans against a brick wall", "fresh bread cools on the kitchen table"]


@pytest.mark.parametrize("which", ["synthtouch", "english"])
def test_the_built_in_tokenizer_reads_the_chat_template_and_its_captions_word_by_word(which):
    """Fitted on the captions phase 2 trains on, any English reads a token per word (a vocabulary fitted on other
    captions cut ordinary words into about a token per letter), and the chat template's words are one token each."""
    captions = data.SynthTouch(400).captions if which == "synthtouch" else ENGLISH * 30
    tokenizer = L.caption_tokenizer(captions, L.PROMPTS[0])
    turn = tokenizer.apply_chat_template([{"role": "user", "content": "\x00" + L.PROMPTS[0]}], tokenize=False,
                                         add_generation_prompt=True)
    pieces = [tokenizer.convert_ids_to_tokens(tokenizer(t, add_special_tokens=False).input_ids) for t in turn.split("\x00")]
    # every position costs the same in the decoder: the template's words are one token each, as the captions' are
    assert pieces == [["<|im_start|>", "user", "Ċ"],
                      ["Describe", "Ġthis", "Ġimage", ":", "<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ"]]
    for caption in set(captions):  # SynthTouch's commas are tokens of their own
        assert len(tokenizer(caption, add_special_tokens=False).input_ids) == len(caption.replace(",", " ,").split())
    assert L.load_decoder("synthtouch-qwen2-tiny")[1].get_vocab() == L.caption_tokenizer(
        data.SynthTouch(L.TOKENIZER_CAPTIONS).captions, L.PROMPTS[0]).get_vocab()  # before fitting: SynthTouch's


@pytest.fixture(scope="module")
def tiny_phase1(tmp_path_factory):
    """A one-epoch phase-1 run on a few SynthTouch samples, through train.py."""
    tmp_path = tmp_path_factory.mktemp("cli")
    cfg = phase1.load_config(None, n_train=32, n_val=8, n_test=16, cache_dir=str(tmp_path / "features"),
                            output_dir=str(tmp_path / "phase1"),
                            **{"model.hidden_dim": 32, "model.n_registers": 4, "model.n_shared": 2,
                               "model.n_layers": 1, "model.n_heads": 2, "model.embed_dim": 32})
    cfg.epochs, cfg.batch_size = 1, 16
    train.train(cfg)
    return cfg.run_dir


PHASE2_FLAGS = ["--epochs", "1", "--batch_size", "16", "--train_decoder", "full", "--min_steps", "0"]


def test_command_line_writes_caption_eval_json(tiny_phase1, decoder_dir, tmp_path):
    out = tmp_path / "phase2"
    L.main(["--phase1_run", str(tiny_phase1), "--output_dir", str(out), "--model_name", decoder_dir, *PHASE2_FLAGS])
    result = json.loads((out / "caption_eval.json").read_text())
    runs = {(r["modalities"], r["k"]) for r in result["rows"]}
    assert runs == {("none", 0)} | {(m, k) for m in ("vision", "touch", "vision+touch") for k in (1, 2, 4)}
    row = result["rows"][-1]
    assert {"bleu4", "cider_d", "accuracy", "accuracy shared", "accuracy vision", "accuracy touch"} <= set(row)
    assert {"probe accuracy", "probe accuracy touch", "probe accuracy hardness"} <= set(row)  # the ceiling beside it
    assert set(result["baselines"]) == {"majority", "chance"} and result["split"] == "test"
    assert L.MultimodalLLM.load(out).llm_cfg.epochs == 1  # the run folder rebuilds its model alone
    epoch = [r for r in train.read_metrics(out) if r["kind"] == "epoch"][-1]
    assert {"val loss", "val accuracy", "val accuracy touch"} <= set(epoch)  # the curve epochs are chosen on
    # the finished run again (a notebook re-run): reused as it is, but captions of another length are made anew,
    # from the same weights (notebook 05's once cut at 12 tokens would otherwise have stayed)
    same = L.load_llm_config(None, epochs=1, batch_size=16, train_decoder="full", model_name=str(decoder_dir), min_steps=0)
    rows, written = train.read_metrics(out), (out / "caption_eval.json").stat().st_mtime_ns
    assert L.ensure_phase2(tiny_phase1, out, same) == result and (out / "caption_eval.json").stat().st_mtime_ns == written
    shorter = L.ensure_phase2(tiny_phase1, out, L.LLMConfig(**{**same.to_dict(), "max_new_tokens": 2}))
    assert shorter["llm"]["max_new_tokens"] == 2 and train.read_metrics(out) == rows


def test_probe_ceilings_are_fit_beside_the_captions_when_a_core_is_spare(tiny_phase1, decoder_dir, tmp_path, monkeypatch):
    """The ceilings read phase-1 tokens only, so with more than one core they are fit in a side thread while the
    decoder captions, also when the second core frees up only once the captions have started (make demo: notebook
    03 ends); with one core all along, after the captions. Either way the same numbers."""
    cfg = L.load_llm_config(None, epochs=1, batch_size=16, train_decoder="full", model_name=str(decoder_dir), min_steps=0)
    fit, caption, in_main, captioning = L.probe_ceilings, phase2.evaluate_captions, [], threading.Event()

    def recording(*args):
        in_main.append(threading.current_thread() is threading.main_thread())
        return fit(*args)

    def slow_captions(*args):  # long enough for the side thread's poll (every second) to see the freed core
        captioning.set()
        time.sleep(2.5)
        return caption(*args)

    monkeypatch.setattr(phase2, "probe_ceilings", recording)
    monkeypatch.setattr(phase2, "evaluate_captions", slow_captions)
    threads = {"one": lambda: 1, "two": lambda: 2, "freed": lambda: 2 if captioning.is_set() else 1}
    results = {}
    for name, given in threads.items():
        monkeypatch.setattr(phase2, "CEILINGS", {})  # fit anew, not from the first run's
        captioning.clear()
        results[name] = L.run_phase2(tiny_phase1, tmp_path / name, cfg, threads=given)
    assert in_main == [True, False, False]
    probes = {name: [{k: v for k, v in row.items() if k.startswith("probe")} for row in result["rows"]]
              for name, result in results.items()}
    assert len(probes["one"]) == 10 and all(len(row) > 1 for row in probes["one"])
    # the same probe on the same rows at one thread, in this thread or another: equal but for summation order,
    # which could flip at most one of the 16 test samples of one attribute (1/16 = 0.0625; averages move less)
    for name in ("two", "freed"):
        for one, other in zip(probes["one"], probes[name]):
            assert one == pytest.approx(other, abs=1 / 16)


def test_command_line_seed_statistics_on_the_validation_split(tiny_phase1, decoder_dir, tmp_path):
    L.main(["--phase1_run", str(tiny_phase1), "--output_dir", str(tmp_path), "--model_name", decoder_dir,
            *PHASE2_FLAGS, "--seeds", "0", "1", "--split", "val"])
    runs = [json.loads((tmp_path / "config" / f"seed{s}" / "caption_eval_val.json").read_text()) for s in (0, 1)]
    assert not list(tmp_path.rglob("caption_eval.json"))  # the test split was never evaluated
    table = pd.read_csv(tmp_path / "phase2_val.csv").set_index(["modalities", "k"])
    last = [r["rows"][-1] for r in runs]  # vision+touch, all tokens
    for column in ("accuracy", "accuracy touch", "probe accuracy touch"):
        values = [r[column] for r in last]
        assert table.loc[("vision+touch", 4), f"{column} mean"] == pytest.approx(sum(values) / 2)
        assert table.loc[("vision+touch", 4), f"{column} std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
    summary = json.loads((tmp_path / "phase2_val.json").read_text())
    targets = summary["settings"]["config"]
    assert summary["split"] == "val" and summary["seeds"] == [0, 1] and targets["source"] == "vision+touch k=4"
    assert targets["accuracy touch / probe"] == pytest.approx(
        table.loc[("vision+touch", 4), "accuracy touch mean"] / table.loc[("vision+touch", 4), "probe accuracy touch mean"])
    assert {"control none: accuracy", "control vision: accuracy touch", "control touch: majority accuracy vision",
            "accuracy vision worst shortfall below probe over k"} <= set(targets)


def test_the_generation_limit_follows_the_captions_and_a_shorter_one_is_named(aligner, decoder_dir):
    """Captions longer than max_new_tokens come out cut off mid-word and never match (notebook 05 once captioned
    "a handwritten dig" with a limit of 12, caption accuracy 0.0). Unset, the limit follows the longest training
    caption; set shorter, training warns with the length that fits; at that length it is silent."""
    import warnings
    tokens, captions, _ = two_class_data(16)
    settings = dict(train_decoder="full", epochs=1, batch_size=16)
    mm = make_mm(aligner, decoder_dir, **settings)
    longest = max(len(mm.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in captions)
    L.fit_captioner(mm, tokens, captions)
    assert longest > 3 and mm.llm_cfg.max_new_tokens == math.ceil(1.25 * longest)
    with pytest.warns(UserWarning, match=rf"max_new_tokens 3 is shorter .*\({longest} tokens.*to {longest} or more "
                                         r"\(--max_new_tokens, or leave it unset"):
        L.fit_captioner(make_mm(aligner, decoder_dir, max_new_tokens=3, **settings), tokens, captions)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        L.fit_captioner(make_mm(aligner, decoder_dir, max_new_tokens=longest, **settings), tokens, captions)


def test_command_line_takes_any_config_key_and_the_generation_limit(tiny_phase1, monkeypatch):
    """llm_integration.py has train.py's grammar: --set KEY=VALUE for any key (dotted into source), and its own flags
    for the common ones, --max_new_tokens among them; a key given twice is refused."""
    given = {}
    monkeypatch.setattr(L, "run_phase2", lambda phase1_run, output_dir, cfg, *a, **k: given.update(cfg=cfg) or
                        {"rows": []})
    L.main(["--phase1_run", str(tiny_phase1), "--output_dir", "unused", "--max_new_tokens", "7",
            "--set", "source.k=2", "source.groups=[shared]", "weight_decay=0.01"])
    cfg = given["cfg"]
    assert (cfg.max_new_tokens, cfg.source.k, cfg.source.groups, cfg.weight_decay) == (7, 2, ("shared",), 0.01)
    assert L.on_phase1_run(cfg, tiny_phase1).source.modalities == ("vision", "touch")  # the phase-1 run's images
    with pytest.raises(SystemExit, match="--set source.k is given twice"):
        L.main(["--phase1_run", str(tiny_phase1), "--output_dir", "unused", "--k", "2", "--set", "source.k=1"])


def test_generate_before_training_warns_once_saying_what_to_call_first(aligner, decoder_dir, tmp_path):
    """The seed quick start's generate on a captioner nobody trained wrote junk without a word: it warns, once."""
    import warnings
    images = [data.SynthTouch(1)[0]["vision"]]
    mm = make_mm(aligner, decoder_dir, train_decoder="full", max_new_tokens=3)
    with pytest.warns(UserWarning, match=r"projector and decoder were never trained.*call train_captioning\(mm_model, "
                                         r"loader\) first.*MultimodalLLM.load\(RUN\)"):
        mm.generate(images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mm.generate(images)  # said once
        tokens, captions, _ = two_class_data(32)
        trained = make_mm(aligner, decoder_dir, train_decoder="full", epochs=1, batch_size=16)
        L.fit_captioner(trained, tokens, captions, tmp_path / "run")
        trained.generate(images)
        make_mm(aligner, decoder_dir, train_decoder="full").load_weights(tmp_path / "run").generate(images)


def test_torchrun_two_processes_train_phase_2_like_one(tiny_phase1, tmp_path):
    """`torchrun llm_integration.py ...`: two gloo processes, each with half of every batch of 16, train the built-in
    decoder (its tokenizer fitted on each rank, saved by rank 0) and the projectors as one process does with the whole
    batch."""
    flags = ["--phase1_run", str(tiny_phase1), "--epochs", "2", "--batch_size", "16", "--min_steps", "0",
             "--set", "log_every=1"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(L.ROOT / "llm_integration.py"), "--output_dir", str(tmp_path / "ddp"), *flags],
                   cwd=tmp_path, env=env, check=False, capture_output=True, timeout=300, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    L.main([*flags, "--output_dir", str(tmp_path / "single")])
    runs = {run: tmp_path / run for run in ("ddp", "single")}
    losses = {run: {r["step"]: r["loss"] for r in train.read_metrics(path) if r["kind"] == "step"} for run, path in runs.items()}
    weights = {run: load_file(str(path / "checkpoint" / "model.safetensors")) for run, path in runs.items()}
    assert losses["ddp"].keys() == losses["single"].keys() == {1, 2, 3, 4}
    # The ranks sum the same float32 terms in another order (halves, then an all-reduce): the step losses agree to
    # rounding (measured 1e-7 relative), and the weights to 6e-8. 1e-6 is far above that, and far below what the 4
    # warm-up steps let AdamW move a weight (lr 2e-5 + 4e-5 + 6e-5 + 8e-5 = 2e-4): ranks stepping on their own half of
    # the batch (no all-reduce) miss it. How the halves are weighed barely moves AdamW's first steps (its step is
    # about lr times the gradient's sign): test_loop checks loop.Distributed.global_mean's weighing directly.
    np.testing.assert_allclose(list(losses["ddp"].values()), list(losses["single"].values()), rtol=1e-5)
    assert weights["ddp"].keys() == weights["single"].keys()
    for name, value in weights["single"].items():
        torch.testing.assert_close(weights["ddp"][name], value, atol=1e-6, rtol=0, msg=name)
    tokenizers = [(path / "tokenizer" / "tokenizer.json").read_text() for path in runs.values()]
    assert tokenizers[0] == tokenizers[1] and (runs["ddp"] / "caption_eval.json").is_file()
