import csv
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from data import ImageTextDataset, SynthTouch, create_dataloader, get_device, set_seed

# -----------------------------------------------------------------------------
# SynthTouch


def test_same_seed_same_samples_other_seed_other_samples():
    a, b, c = SynthTouch(20, seed=1), SynthTouch(20, seed=1), SynthTouch(20, seed=2)
    for i in range(20):
        assert torch.equal(a[i]["vision"], b[i]["vision"]) and torch.equal(a[i]["touch"], b[i]["touch"])
        assert a[i]["caption"] == b[i]["caption"] and a[i]["factors"] == b[i]["factors"]
        assert not torch.equal(a[i]["vision"], c[i]["vision"]) and not torch.equal(a[i]["touch"], c[i]["touch"])
    assert a.captions == b.captions != c.captions


def test_splits_share_no_sample():
    seen = {}
    for split in SynthTouch.SPLITS:
        ds = SynthTouch(200, seed=0, image_size=16, split=split)
        for i in range(len(ds)):
            key = ds[i]["vision"].numpy().tobytes()
            assert key not in seen, f"{split}[{i}] equals {seen[key]}"
            seen[key] = (split, i)


def test_shapes_dtypes_ranges_and_item_keys():
    for size in (16, 64, 100):
        sample = SynthTouch(3, image_size=size)[2]
        assert set(sample) == {"vision", "touch", "caption", "factors", "index"} and sample["index"] == 2
        for modality in ("vision", "touch"):
            image = sample[modality]
            assert image.shape == (3, size, size) and image.dtype == torch.float32 and image.is_contiguous()
            assert 0 <= image.min() and image.max() <= 1 and image.std() > 0.02  # not blank
        factors = sample["factors"]
        assert set(factors) == set(SynthTouch.factor_groups)
        assert all(isinstance(factors[name], str) for name in SynthTouch.FACTORS)
        assert all(isinstance(factors[name], float) for name in SynthTouch.CONTINUOUS_FACTORS)


def test_factors_of_and_factor_table_match_rendered_samples():
    ds = SynthTouch(30, seed=3)
    table = ds.factor_table()
    for i in range(len(ds)):
        factors = ds[i]["factors"]
        assert ds.factors_of(i) == factors and ds.captions[i] == ds[i]["caption"]
        for name, values in SynthTouch.FACTORS.items():
            assert values[table[name][i]] == factors[name]
        for name in SynthTouch.CONTINUOUS_FACTORS:
            assert table[name][i] == factors[name]
    # drawn once and kept: what a caller does to its copy reaches no other caller, and the range is an item's
    edited = ds.factors_of(0)
    edited["color"] = "edited"
    assert ds.factors_of(0) == ds[0]["factors"] and ds.captions[0] == ds[0]["caption"]
    for outside in (-1, len(ds)):
        with pytest.raises(IndexError, match="out of range"):
            ds.factors_of(outside)


def test_every_factor_value_is_drawn():
    table = SynthTouch(300, seed=0).factor_table()
    for name, values in SynthTouch.FACTORS.items():
        assert set(table[name]) == set(range(len(values))), name


def _changed_images(factor, value, other, seed):
    ds = SynthTouch(1, image_size=32)
    fixed = {name: values[0] for name, values in SynthTouch.FACTORS.items()}
    a, b = ds.render({**fixed, factor: value}, seed), ds.render({**fixed, factor: other}, seed)
    return not torch.equal(a["vision"], b["vision"]), not torch.equal(a["touch"], b["touch"])


@pytest.mark.parametrize("factor", list(SynthTouch.FACTORS))
def test_private_factors_are_pixel_exactly_private(factor):
    group = SynthTouch.factor_groups[factor]
    values = SynthTouch.FACTORS[factor]
    for value in values:  # every value against every other one, with the noise seed fixed
        for other in values:
            if other != value:
                vision_changed, touch_changed = _changed_images(factor, value, other, seed=7)
                assert vision_changed == (group in ("shared", "vision")), (factor, value, other)
                assert touch_changed == (group in ("shared", "touch")), (factor, value, other)


@pytest.mark.parametrize("detail", list(SynthTouch.DETAILS))
def test_every_tile_of_a_detail_reaches_exactly_its_modalities(detail):
    """Fine factors keep the privacy guarantee tile by tile: changing one tile's value changes the images of
    the modalities that see the detail, and leaves the other's bit-identical. Light pressure, the smaller
    contact disk, so a shared tile the gel could not feel would show up here."""
    ds, group = SynthTouch(1, image_size=32), SynthTouch.factor_groups[detail]
    base = dict(pressure="light", texture="stripes", roughness="coarse")
    tiles = SynthTouch.DETAILS[detail] ** 2
    for tile in range(tiles):
        low, high = [0.1] * tiles, [0.1] * tiles
        high[tile] = 0.9
        a, b = ds.render({**base, detail: low}, seed=5), ds.render({**base, detail: high}, seed=5)
        assert (not torch.equal(a["vision"], b["vision"])) == (group in ("shared", "vision")), (detail, tile)
        assert (not torch.equal(a["touch"], b["touch"])) == (group in ("shared", "touch")), (detail, tile)


def test_details_are_tuples_of_tile_values_in_the_factor_table():
    ds = SynthTouch(20, seed=2)
    table = ds.factor_table()
    for name, side in SynthTouch.DETAILS.items():
        assert table[name].shape == (20, side * side) and 0 <= table[name].min() and table[name].max() < 1
        assert tuple(table[name][3]) == ds.factors_of(3)[name]
        assert SynthTouch.is_continuous(name) and SynthTouch.SCALE[name] == "fine"


def test_phase_is_shared():
    ds = SynthTouch(1)
    a, b = ds.render(dict(phase_x=0.05), seed=3), ds.render(dict(phase_x=0.2), seed=3)
    assert not torch.equal(a["vision"], b["vision"]) and not torch.equal(a["touch"], b["touch"])


def test_render_keeps_unspecified_factors_and_noise_from_seed():
    ds = SynthTouch(1)
    a, b = ds.render({}, seed=11), ds.render({}, seed=11)
    assert torch.equal(a["vision"], b["vision"]) and a["factors"] == b["factors"] and a["index"] == -1
    fixed = ds.render(dict(color="blue"), seed=11)["factors"]
    assert fixed == {**a["factors"], "color": "blue"}


def test_caption_covers_every_factor_and_parses_back():
    ds = SynthTouch(50, seed=5)
    for i in range(len(ds)):
        sample = ds[i]
        words = sample["caption"].split(", ")
        assert len(words) == len(SynthTouch.FACTORS)
        expected = {name: sample["factors"][name] for name in SynthTouch.FACTORS}
        assert SynthTouch.parse_caption(sample["caption"]) == expected
    adjectives = [a for values in SynthTouch.ADJECTIVES.values() for a in values.values()]
    assert len(adjectives) == len(set(adjectives))
    assert SynthTouch.parse_caption("A red surface, it feels soft.") == dict(
        dict.fromkeys(SynthTouch.FACTORS), color="red", hardness="soft")


def test_bad_inputs_raise_clear_errors():
    ds = SynthTouch(2)
    with pytest.raises(ValueError, match="pink"):
        ds.render(dict(color="pink"), seed=0)
    with pytest.raises(ValueError, match="smell"):
        ds.render(dict(smell="sweet"), seed=0)
    with pytest.raises(ValueError, match="phase_x"):
        ds.render(dict(phase_x=0.5), seed=0)
    with pytest.raises(ValueError, match="stain.*4 values"):
        ds.render(dict(stain=[0.5] * 9), seed=0)
    with pytest.raises(ValueError, match="wear.*in \\[0, 1\\)"):
        ds.render(dict(wear=[1.5] * 9), seed=0)
    with pytest.raises(ValueError, match="image_size"):
        SynthTouch(2, image_size=8)
    with pytest.raises(ValueError, match="train, val, test"):
        SynthTouch(2, split="dev")
    with pytest.raises(IndexError):
        ds[2]


def test_fingerprint_names_the_content():
    assert SynthTouch(10, seed=1).fingerprint == SynthTouch(10, seed=1).fingerprint
    prints = {SynthTouch(10, seed=1).fingerprint, SynthTouch(11, seed=1).fingerprint,
              SynthTouch(10, seed=2).fingerprint, SynthTouch(10, seed=1, image_size=32).fingerprint,
              SynthTouch(10, seed=1, split="val").fingerprint}
    assert len(prints) == 5


# -----------------------------------------------------------------------------
# a tiny fake TVL layout: its images serve the seed-package tests below


def _jpeg(path, color):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (20, 12), color).save(path)


def _csv(path, header, rows):
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture
def tvl_root(tmp_path):
    ssvtp = tmp_path / "ssvtp"
    for n, color in ((3, (255, 0, 0)), (8, (0, 255, 0))):
        _jpeg(str(ssvtp / f"images_rgb/image_{n}_rgb.jpg"), color)
        _jpeg(str(ssvtp / f"images_tac/image_{n}_tac.jpg"), (0, 0, 255))
        os.makedirs(ssvtp / "text", exist_ok=True)
        (ssvtp / "text" / f"labels_{n}.txt").write_text(f"smooth, hard {n}\nsecond line is ignored\n")
    _csv(ssvtp / "train.csv", ["url"], [["images_rgb/image_3_rgb.jpg"], ["images_rgb/image_8_rgb.jpg"]])
    hct = tmp_path / "hct" / "data2"
    _jpeg(str(hct / "0/vision/1.jpg"), (255, 255, 255))
    _jpeg(str(hct / "0/tactile/1.jpg"), (0, 0, 0))
    _csv(hct / "train.csv", ["url", "tactile", "tactile_background", "caption"],
         [["0/vision/1.jpg", "0/tactile/1.jpg", "0/bg.jpg", "bumpy, rough"]])
    return tmp_path


# TVLDataset itself: tests/test_real_data.py


# -----------------------------------------------------------------------------
# seed-package API


def test_image_text_dataset_accepts_paths_pil_and_tensors(tvl_root):
    images = [str(tvl_root / "ssvtp/images_rgb/image_3_rgb.jpg"), Image.new("RGB", (5, 7), (0, 255, 0)),
              torch.rand(3, 10, 10), torch.full((3, 32, 32), 255, dtype=torch.uint8)]
    ds = ImageTextDataset(images, ["a", "b", "c", "d"], image_size=32)
    for i in range(4):
        item = ds[i]
        assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
        assert 0 <= item["image"].min() and item["image"].max() <= 1
    assert ds[3]["caption"] == "d" and torch.all(ds[3]["image"] == 1)
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        ImageTextDataset(images[:2], ["a"])


def test_image_text_dataset_from_pairs():
    synth = SynthTouch(4, image_size=16)
    ds = ImageTextDataset.from_pairs(synth, modality="touch", image_size=16)
    assert len(ds) == 4 and torch.equal(ds[1]["image"], synth[1]["touch"]) and ds[1]["caption"] == synth[1]["caption"]


def test_create_dataloader_collates_and_shuffles_deterministically():
    ds = SynthTouch(10, image_size=16)
    batch = next(iter(create_dataloader(ds, batch_size=4, shuffle=False)))
    assert batch["vision"].shape == (4, 3, 16, 16) and batch["touch"].shape == (4, 3, 16, 16)
    assert batch["caption"] == [ds[i]["caption"] for i in range(4)]
    assert batch["index"].tolist() == [0, 1, 2, 3]
    assert batch["factors"]["color"] == [ds[i]["factors"]["color"] for i in range(4)]
    assert batch["factors"]["phase_x"] == [ds[i]["factors"]["phase_x"] for i in range(4)]

    def order(seed):
        return [i for b in create_dataloader(ds, batch_size=3, seed=seed) for i in b["index"].tolist()]
    assert order(0) == order(0) != order(1) and sorted(order(0)) == list(range(10))
    assert len(list(create_dataloader(ds, batch_size=4, drop_last=True))) == 2


def test_set_seed_and_device():
    set_seed(4)
    a = [random.random(), np.random.rand(), torch.rand(1).item()]
    set_seed(4)
    assert a == [random.random(), np.random.rand(), torch.rand(1).item()]
    assert isinstance(get_device(), torch.device)


@pytest.mark.parametrize("phase", ["phase_x", "phase_y"])
@pytest.mark.parametrize("texture", SynthTouch.FACTORS["texture"])
def test_phase_periods_are_the_ones_the_renderer_draws(texture, phase):
    """The probe target of a phase (information.probe_target) relies on these periods: check them on pixels.
    Same factors and noise streams, only the phase shifted: a period reproduces the image, less does not."""
    ds = SynthTouch(1, image_size=64)

    def image(shift):
        streams = ds._streams_from(np.random.SeedSequence(1))
        factors = {**ds.draw(streams[0]), "texture": texture, phase: 0.3 + shift}
        return ds.renderer.render(factors, ds._streams_from(np.random.SeedSequence(1)))["vision"]

    period, base = SynthTouch.PHASE_PERIODS[phase][texture], image(0)
    differs = {shift: (image(shift) - base).abs().max().item() > 0.1 for shift in (0.37, 1, 2)}
    if period is None:
        assert not any(differs.values())  # the texture does not show this phase at all
    else:
        assert differs[0.37] and not differs[period] and differs[1] == (period == 2)


def test_probe_targets_follow_each_textures_period_and_skip_textures_without_the_phase():
    from information import probe_target
    textures = SynthTouch.FACTORS["texture"]
    factors = {"texture": np.array([textures.index(t) for t in ("stripes", "checker", "dots")]),
               "phase_y": np.array([0.25, 0.5, 0.5])}
    target, rows = probe_target("phase_y", factors)
    assert rows.tolist() == [False, True, True]  # stripes do not depend on phase_y
    # the same phase 0.5 is a quarter turn on checker's period-2 circle and half a turn on dots' period 1
    np.testing.assert_allclose(target, [[0, 1], [-1, 0]], atol=1e-12)
    codes, every = probe_target("texture", factors)
    assert codes.tolist() == [0, 1, 2] and every.all()


def test_images_are_read_as_a_viewer_shows_them(tmp_path):
    """A 16-bit grey PNG came out white (PIL clips it to 8 bits), a phone's portrait lay on its side (EXIF
    orientation), a transparent pixel showed the colour stored under it."""
    from PIL import Image

    import images
    grey = tmp_path / "grey16.png"
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(grey)  # mid-grey at 16 bits
    assert Image.open(grey).mode.startswith("I")
    np.testing.assert_allclose(images.load_image(grey, 4).numpy(), 128 / 255, atol=1 / 255)  # one 8-bit level
    upright = np.zeros((6, 4, 3), dtype=np.uint8)
    upright[0] = 255  # a white top row
    sideways = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # stored turned, as a phone does
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turn 90° clockwise to view (undoes the counter-clockwise ROTATE_90)
    sideways.save(tmp_path / "portrait.jpg", exif=exif, quality=100)
    seen = np.asarray(images.open_image(tmp_path / "portrait.jpg"))
    assert seen.shape == (6, 4, 3) and seen[0].mean() > 200 and seen[1:].mean() < 60  # JPEG: near, not exact
    clear = np.zeros((2, 2, 4), dtype=np.uint8)
    clear[..., 0] = 255  # red, but fully transparent
    Image.fromarray(clear, "RGBA").save(tmp_path / "clear.png")
    assert np.asarray(images.open_image(tmp_path / "clear.png")).min() == 255  # white, as a viewer shows it
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with pytest.raises(ValueError, match=r"image .*bomb.png is corrupt"):
        images.open_image(tmp_path / "bomb.png")
