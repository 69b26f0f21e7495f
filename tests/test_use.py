"""A trained model used as a user would: loaded from another working directory, fed image files, PIL images or
tensors, and the command line that embeds or captions a folder or a CSV of images (predict.py)."""
import csv
import os
import warnings

import pytest
import yaml
from PIL import Image

import data
import images
import llm_integration as L
import phase1
import predict
import train
from conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A phase-1 run and its phase-2 run (the built-in decoder), trained with paths relative to their working
    directory, as the README's commands give them."""
    work = tmp_path_factory.mktemp("work")
    before = os.getcwd()
    os.chdir(work)
    try:
        sizes = [f"{k}={v}" for k, v in {**TINY, "n_train": 32, "n_val": 8, "n_test": 8}.items()
                 if k not in ("epochs", "batch_size")]
        train.main(["--output_dir", "runs/p1", "--epochs", "1", "--batch_size", "16", "--set", *sizes])
        L.main(["--phase1_run", "runs/p1", "--output_dir", "runs/p2", "--epochs", "1", "--batch_size", "16",
                "--max_new_tokens", "6", "--k", "2", "--min_steps", "0"])
    finally:
        os.chdir(before)
    return work / "runs" / "p1", work / "runs" / "p2"


def write_pngs(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    synth = data.SynthTouch(n, seed=7)
    for i in range(n):
        Image.fromarray((synth[i]["vision"].permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(
            folder / f"{i}.png")
    return sorted(folder.iterdir())


def test_a_run_and_its_phase_2_run_are_used_from_another_working_directory(runs, tmp_path, monkeypatch):
    phase1_run, phase2_run = runs
    # paths inside the runs are kept relative to the run, so the working directory they were trained from is no key
    assert yaml.safe_load((phase2_run / "config.yaml").read_text())["phase1_run"] == "../p1"
    assert yaml.safe_load((phase1_run / "config.yaml").read_text())["cache_dir"] == "../../cache/features"
    elsewhere = tmp_path / "elsewhere"
    (png,) = write_pngs(elsewhere, 1)
    monkeypatch.chdir(elsewhere)
    aligner = phase1.load_aligner(phase1_run)
    size = aligner.encoder("vision").cfg.image_size
    by_path = aligner.embed("vision", png.name, k=2)
    assert by_path.shape == (1, aligner.cfg.embed_dim) and float(by_path.norm()) == pytest.approx(1, abs=1e-5)
    # a path, a PIL image and the tensor a CSV dataset reads are one image: the same embedding, bit for bit (the
    # same pixels through the same kernels)
    assert (aligner.embed("vision", [Image.open(png)], k=2) == by_path).all()
    assert (aligner.embed("vision", [images.load_image(png, size)], k=2) == by_path).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a trained captioner: no "never trained" warning
        mm = L.MultimodalLLM.load(phase2_run)
        caption = mm.generate(png.name)
    assert isinstance(caption, list) and len(caption) == 1 and isinstance(caption[0], str)
    assert mm.generate([Image.open(png)]) == caption
    assert sorted(os.listdir(elsewhere)) == ["0.png"]  # nothing cached into the caller's working directory


def test_the_command_line_captions_a_folder_and_embeds_a_csv_into_csv_files(runs, tmp_path):
    phase1_run, phase2_run = runs
    pngs = write_pngs(tmp_path / "images", 3)
    predict.main([str(phase2_run), str(tmp_path / "images"), "--k", "1", "--out", str(tmp_path / "captions.csv")])
    with open(tmp_path / "captions.csv", newline="") as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["image", "caption"] and [r[0] for r in rows[1:]] == [str(p) for p in pngs]
    assert [r[1] for r in rows[1:]] == L.MultimodalLLM.load(phase2_run).generate(pngs, k=1)
    # a CSV of your own data's layout, paths relative to it: one embedding per row
    data.write_csv(tmp_path / "images.csv", [["vision"], *([f"images/{p.name}"] for p in pngs)])
    predict.main([str(phase1_run), str(tmp_path / "images.csv"), "--k", "2", "--out", str(tmp_path / "emb.csv")])
    with open(tmp_path / "emb.csv", newline="") as file:
        rows = list(csv.reader(file))
    assert len(rows) == 4 and rows[0][:2] == ["image", "e0"] and len(rows[1]) == 1 + phase1.load_aligner(
        phase1_run).cfg.embed_dim
    with pytest.raises(ValueError, match=r"images.csv has no touch column"):
        predict.main([str(phase1_run), str(tmp_path / "images.csv"), "--modality", "touch", "--out", "x.csv"])
