"""The feature cache: computed once, then read from disk without the encoder; equal to the encoder's
outputs; memory-mapped; a damaged or partial cache is detected, reported and rebuilt."""
import warnings

import numpy as np
import pytest
import torch

from data import SynthTouch, cached_features
from encoders import create_encoder


@pytest.fixture(scope="module")
def encoders():
    return {"touch": create_encoder("synth-touch"), "text": create_encoder("minilm")}


@pytest.fixture(scope="module")
def dataset():
    return SynthTouch(10, seed=5, image_size=64, split="val")


@pytest.fixture
def counted(monkeypatch):
    """Wraps an encoder's forward so the test can see how many batches it encoded."""
    def wrap(encoder):
        calls = []
        original = encoder.forward

        def forward(inputs):
            calls.append(len(inputs))
            return original(inputs)
        monkeypatch.setattr(encoder, "forward", forward)
        return calls
    return wrap


def cache_folder(cache_dir):
    (folder,) = [p for p in cache_dir.iterdir() if p.is_dir()]  # beside it: the lock file of its builders
    return folder


def direct(encoder, dataset):
    key = "caption" if encoder.modality == "text" else encoder.modality
    items = [dataset[i][key] for i in range(len(dataset))]
    return encoder(items if encoder.modality == "text" else torch.stack(items))


@pytest.mark.parametrize("modality", ["touch", "text"])
def test_second_call_reads_the_cache_and_equals_the_encoder(encoders, dataset, counted, tmp_path, modality):
    encoder = encoders[modality]
    calls = counted(encoder)
    first = cached_features(encoder, dataset, tmp_path, batch_size=4)
    assert sum(calls) == len(dataset)  # every sample encoded once, in batches of 4
    calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a healthy cache is read silently
        second = cached_features(encoder, dataset, tmp_path, batch_size=4)
    assert calls == []
    assert all(isinstance(a, np.memmap) for a in second)
    assert second.pooled.dtype == np.float32 and second.tokens.dtype == np.float16 and second.mask.dtype == bool
    expected = direct(encoder, dataset)
    for cached in (first, second):
        np.testing.assert_allclose(cached.pooled, expected.pooled.numpy(), atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(cached.mask, expected.mask.numpy())
        real = expected.mask.numpy()  # padded text positions are masked out everywhere downstream
        np.testing.assert_allclose(cached.tokens[real].astype(np.float32), expected.tokens.numpy()[real],
                                   rtol=2e-3, atol=2e-3)  # stored as float16
    batch = second.batch([1, 3])
    assert batch.tokens.dtype == torch.float32 and batch.tokens.shape == (2, encoder.num_tokens, encoder.dim)


def test_cache_is_keyed_by_encoder_and_dataset(encoders, dataset, counted, tmp_path):
    cached_features(encoders["touch"], dataset, tmp_path)
    other_encoder = create_encoder("synth-touch", init_seed=1)
    calls = counted(other_encoder)
    other = cached_features(other_encoder, dataset, tmp_path)
    assert sum(calls) == len(dataset)  # another encoder config is not served the first one's features
    other_data = cached_features(encoders["touch"], SynthTouch(10, seed=6, image_size=64, split="val"), tmp_path)
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 3
    first = cached_features(encoders["touch"], dataset, tmp_path)
    assert not np.allclose(first.pooled, other.pooled) and not np.allclose(first.pooled, other_data.pooled)


def truncate_tokens(folder):
    path = folder / "tokens.npy"
    path.write_bytes(path.read_bytes()[:-100])


def flip_pooled_bytes(folder):  # same size, same header: only the checksum can tell
    path = folder / "pooled.npy"
    raw = bytearray(path.read_bytes())
    raw[-8:] = bytes(8)
    path.write_bytes(bytes(raw))


def delete_meta(folder):
    (folder / "meta.json").unlink()


def delete_mask(folder):
    (folder / "mask.npy").unlink()


def garble_meta(folder):
    (folder / "meta.json").write_text('{"shapes": ')


@pytest.mark.parametrize("damage", [truncate_tokens, flip_pooled_bytes, delete_meta, delete_mask, garble_meta])
def test_damaged_cache_is_reported_and_rebuilt(encoders, dataset, counted, tmp_path, damage):
    encoder = encoders["touch"]
    good = cached_features(encoder, dataset, tmp_path)
    expected = [np.array(a) for a in good]
    del good  # release the memmaps before the files change
    damage(cache_folder(tmp_path))
    calls = counted(encoder)
    with pytest.warns(UserWarning, match="corrupt or partial.*rebuilding"):
        rebuilt = cached_features(encoder, dataset, tmp_path)
    assert sum(calls) == len(dataset)
    for a, b in zip(rebuilt, expected):  # the same encoder in the same process and thread count: same bits
        np.testing.assert_array_equal(a, b)
    calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cached_features(encoder, dataset, tmp_path)
    leftovers = [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")]  # no .tmp / .old folder
    assert calls == [] and leftovers == [cache_folder(tmp_path).name]


def test_what_a_killed_build_left_is_swept_and_a_cache_set_aside_goes_back(encoders, dataset, counted, tmp_path):
    """A build killed while encoding leaves `<folder>.tmp<pid>` (it used to stay forever); one killed between
    setting the old cache aside and moving the new one in leaves only `<folder>.old<pid>`, a complete cache."""
    cached_features(encoders["touch"], dataset, tmp_path)
    folder = cache_folder(tmp_path)
    partial = folder.with_name(folder.name + ".tmp4242")
    partial.mkdir()
    (partial / "tokens.npy").write_bytes(b"half")
    folder.rename(folder.with_name(folder.name + ".old4242"))
    calls = counted(encoders["touch"])
    cached_features(encoders["touch"], dataset, tmp_path)
    assert calls == []  # the cache set aside was complete: it is read, not rebuilt
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([folder.name, folder.name + ".lock"])


def test_an_image_replaced_with_the_same_size_and_time_gives_another_cache(tmp_path):
    """cp -p, rsync -t or touch -r can give a new image the old one's size and modification time."""
    import os

    import data
    folder = data.write_csv_dataset(tmp_path / "mine", {split: [{"vision": torch.rand(3, 8, 8), "caption": "a photo"}]
                                                        for split in ("train", "val", "test")})
    image = folder / "images" / "test_0_vision.png"
    before, stat = data.CSVDataset(folder, split="test", image_size=8).fingerprint, image.stat()
    image.write_bytes(image.read_bytes()[::-1])  # other content, the same number of bytes
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert image.stat().st_size == stat.st_size and image.stat().st_mtime_ns == stat.st_mtime_ns
    assert data.CSVDataset(folder, split="test", image_size=8).fingerprint != before
