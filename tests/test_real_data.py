"""Real data and real weights: TVL folders and TVL stage-1 checkpoints through the seed command lines, your
own CSV files, caption-level retrieval and the COCO caption metrics. Every folder here is built in the exact
layout (tiny JPEGs/PNGs, the real CSV headers, labels_N.txt, contact.json), and the checkpoint in TVL's key
layout from a timm ViT at 224 px."""
import argparse
import csv
import json
import math
import os
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from sklearn.model_selection import train_test_split

import data
import evaluate
import layouts
import llm_integration as L
import phase1
import retrieval
import train
from captions import adjective_scores, bleu4, exact_match, is_adjective_list, tokenize
from encoders import TVL_TACTILE_MEAN_STD, create_encoder, resolve_encoder, write_tvl_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tvl_dir(tmp_path_factory):
    """24 training and 8 test pairs: ssvtp/ and hct/data{1,2,3}/ (SynthTouch samples, so retrieval is learnable)."""
    folder = tmp_path_factory.mktemp("tvl")
    return data.write_tvl_layout(folder, {"train": data.SynthTouch(24, image_size=32),
                                          "test": data.SynthTouch(8, image_size=32, split="test")}, image_size=32)


@pytest.fixture(scope="module")
def tactile_vit():
    torch.manual_seed(7)  # weights unlike any encoder's own seeded initialisation
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=768, global_pool="avg").eval()


@pytest.fixture(scope="module")
def stage1_checkpoint(tactile_vit, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "stage1_best.pth"
    return str(write_tvl_checkpoint(tactile_vit, path, tactile_model="vit_tiny_patch16_224", batch_size=256,
                                         subtract_background=None, datasets=["ssvtp", "hct"]))


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run where the seed command lines write by default (cache/, runs/): a fresh folder."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ----------------------------------------------------------------------------------------------
# The folders and the checkpoint are in TVL's exact layout

def test_the_generated_folder_is_in_the_exact_tvl_layout(tvl_dir):
    with open(tvl_dir / "ssvtp" / "train.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["url"] and all(r[0].startswith("images_rgb/image_") and r[0].endswith("_rgb.jpg") for r in rows[1:])
    number = rows[1][0].split("_")[2]
    assert (tvl_dir / "ssvtp" / "images_tac" / f"image_{number}_tac.jpg").is_file()
    assert (tvl_dir / "ssvtp" / "text" / f"labels_{number}.txt").read_text().count(",") == 6
    for k in (1, 2, 3):
        hct = tvl_dir / "hct" / f"data{k}"
        with open(hct / "train.csv") as f:
            header, first = list(csv.reader(f))[:2]
        assert header == ["url", "tactile", "tactile_background", "caption"]
        assert all((hct / p).is_file() for p in first[:3])
        assert set(json.loads((hct / "contact.json").read_text())) == {"vision", "tactile", "background"}
    assert Image.open(tvl_dir / "ssvtp" / rows[1][0]).format == "JPEG"


def test_the_checkpoint_has_tvls_key_layout(stage1_checkpoint):
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(stage1_checkpoint, weights_only=True)
    assert set(ckpt) == {"model", "optimizer", "epoch", "scaler", "args"}
    assert isinstance(ckpt["args"], argparse.Namespace)
    assert "logit_scale" in ckpt["model"] and all(k == "logit_scale" or k.startswith("tactile_encoder.")
                                                  for k in ckpt["model"])


# ----------------------------------------------------------------------------------------------
# The touch encoder is rebuilt from the checkpoint itself

def test_checkpoint_sets_architecture_size_and_normalisation(stage1_checkpoint):
    cfg = resolve_encoder("tvl-touch-vit-tiny", weights=stage1_checkpoint, image_size=64)
    assert (cfg.model_name, cfg.image_size, cfg.dim) == ("vit_tiny_patch16_224", 224, 768)  # not the 64 asked for
    assert (cfg.mean, cfg.std) == TVL_TACTILE_MEAN_STD[False] and not cfg.background


def test_checkpoint_touch_encoder_gives_the_saved_models_outputs(stage1_checkpoint, tactile_vit):
    encoder = create_encoder("tvl-touch-vit-tiny", weights=stage1_checkpoint)
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in TVL_TACTILE_MEAN_STD[False])
    with torch.no_grad():
        expected = tactile_vit((images - mean) / std)
    pooled = encoder(images).pooled
    # The same weights on the same inputs: only float32 summation order (threads, kernels) can differ, ~1e-7
    # relative per operation, amplified through 12 blocks and their layer norms to well under 1e-4 relative.
    torch.testing.assert_close(pooled, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert encoder.num_tokens == 196 and encoder.dim == 768


def test_background_subtraction_comes_from_the_checkpoint_args(tactile_vit, tmp_path):
    path = write_tvl_checkpoint(tactile_vit, tmp_path / "bg.pth", tactile_model="vit_tiny_patch16_224",
                                     subtract_background="background")
    cfg = resolve_encoder("tvl-touch-vit-tiny", weights=str(path))
    assert cfg.background and (cfg.mean, cfg.std) == TVL_TACTILE_MEAN_STD[True]


class RunsCode:
    """Unpickling this calls os.makedirs: what a malicious checkpoint could do with any callable."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_a_checkpoint_carrying_another_object_is_refused_and_nothing_runs(tactile_vit, tvl_dir, in_tmp):
    marker = in_tmp / "code-ran"
    path = in_tmp / "evil.pth"
    write_tvl_checkpoint(tactile_vit, path, tactile_model="vit_tiny_patch16_224")
    with torch.serialization.safe_globals([argparse.Namespace]):  # our own file, in TVL's allowed layout
        ckpt = torch.load(path, weights_only=True)
    ckpt["args"].payload = RunsCode(str(marker))
    torch.save(ckpt, path)
    with pytest.raises(pickle.UnpicklingError, match="evil.pth holds a pickled object.*refused without running it"):
        train.main(["--stage1_checkpoint", str(path), "--datasets_dir", str(tvl_dir), "--output_dir", "out",
                    "--epochs", "1", "--batch_size", "8"])
    assert not marker.exists() and not (in_tmp / "out").exists()


# ----------------------------------------------------------------------------------------------
# The seed command lines run as written on a TVL folder

SMALL = """
encoders: {vision: synth-vision, touch: tvl-touch-vit-tiny, text: minilm}
dataset: tvl
image_size: 64
model: {design: DESIGN, modalities: [vision, touch], hidden_dim: 64, n_layers: 1, n_heads: 4, embed_dim: 64,
        attention: ATTENTION, nested_dropout: DROPOUT}
warmup_steps: 2
"""


def small_config(folder, design="flextok", attention="joint", dropout="power_of_two"):
    path = folder / f"{design}.yaml"
    path.write_text(SMALL.replace("DESIGN", design).replace("ATTENTION", attention).replace("DROPOUT", dropout))
    return str(path)


SEED = ["--stage1_checkpoint", "CKPT", "--datasets_dir", "DIR", "--output_dir", "runs/seed", "--epochs", "1",
        "--batch_size", "8"]


@pytest.mark.parametrize("flags", [
    ["--n_registers", "32", "--n_shared", "8"],
    ["--config", "flextok", "--n_registers", "32", "--n_shared", "8", "--loss_type", "combined", "--flow_weight", "0.5"],
    ["--config", "fluxtalk", "--num_register_tokens", "4", "--num_overlapping_tokens", "3", "--nested_dropout_rate",
     "0.5", "--complementary_reg_weight", "0.01"],
], ids=["default-config", "flextok-flow", "fluxtalk"])
def test_seed_command_lines_train_end_to_end_on_tvl(flags, tvl_dir, stage1_checkpoint, in_tmp):
    configs = {"flextok": small_config(in_tmp), "fluxtalk": small_config(in_tmp, "fluxtalk", "cross", "linear")}
    argv = [{"CKPT": stage1_checkpoint, "DIR": str(tvl_dir)}.get(a, a) for a in SEED]
    argv += [configs.get(a, a) for a in flags]
    train.main(argv)
    run = in_tmp / "runs" / "seed"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["dataset"] == "tvl" and saved["encoders"]["touch"]["weights"] == stage1_checkpoint
    assert [r["epoch"] for r in train.read_metrics(run) if r["kind"] == "epoch"] == [0]
    table = evaluate.read_eval(run / "eval.json")
    captions = data.TVLDataset(tvl_dir, "test").captions
    assert len(captions) == 8
    # a caption hit is at least as likely as a pair hit, and chance follows the caption frequencies
    counts = np.unique(captions, return_counts=True)[1]
    assert table["chance@1 caption"].iloc[0] == pytest.approx(np.sum(counts ** 2) / len(captions) ** 2)
    assert (table["vision->touch R@1 caption"] >= table["vision->touch R@1 pair"]).all()
    # TVL's own number at every k, beside R@1: by its definition the two directions' exact-pair top-1 averaged (on 8
    # test pairs each is a multiple of 1/8, so only an exact tie, ranked apart by the two computations, could split them)
    pair = (table["touch->vision R@1 pair"] + table["vision->touch R@1 pair"]) / 2
    np.testing.assert_allclose(table[retrieval.TVL_TOP1], pair, atol=1e-6)
    assert retrieval.TVL_TOP1 in evaluate.retrieval_columns(table)  # what train.py prints and notebook 05 shows
    # each encoder got its images at its own size: 64 px vision, the checkpoint's 224 px touch
    touch = phase1.get_encoder(phase1.load_config(run / "config.yaml"), "touch")
    assert touch.cfg.image_size == 224


def test_seed_command_line_under_torchrun_on_tvl(tvl_dir, stage1_checkpoint, in_tmp):
    """`torchrun --nproc_per_node=2 train.py --stage1_checkpoint ... --datasets_dir ...` as the seeds write it."""
    argv = [{"CKPT": stage1_checkpoint, "DIR": str(tvl_dir)}.get(a, a) for a in SEED]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": ROOT}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    os.path.join(ROOT, "train.py"), *argv, "--n_registers", "32", "--n_shared", "8",
                    "--set", "model.hidden_dim=32", "model.n_heads=2", "model.n_layers=1", "warmup_steps=2"],
                   cwd=in_tmp, env=env, check=True, capture_output=True, timeout=300)
    run = in_tmp / "runs" / "seed"
    assert [r["epoch"] for r in train.read_metrics(run) if r["kind"] == "epoch"] == [0]
    table = evaluate.read_eval(run / "eval.json")
    assert list(table.index) == [1, 2, 4, 8, 16, 32] and "vision->touch R@1 caption" in table


def test_a_missing_pretrained_encoder_fails_at_once_saying_what_to_pass(tvl_dir, stage1_checkpoint, in_tmp, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # never download here, even where the hub answers
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(in_tmp / "empty-hub-cache"))
    started = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"ViT-L-14.*datacomp_xl_s13b_b90k.*encoders\.vision"):
        train.main(["--config", os.path.join(ROOT, "configs", "tvl.yaml"), "--stage1_checkpoint", stage1_checkpoint,
                    "--datasets_dir", str(tvl_dir), "--output_dir", "out", "--epochs", "1"])
    with pytest.raises(OSError, match=r"all-mpnet-base-v2.*encoders\.text"):
        create_encoder("minilm", model_name="sentence-transformers/all-mpnet-base-v2")
    assert time.perf_counter() - started < 60  # ViT-L-14's random init is most of it; no download retries


def test_tvl_config_is_the_seeds_setting():
    cfg = phase1.load_config(os.path.join(ROOT, "configs", "tvl.yaml"))
    vision = phase1.encoder_config(cfg, "vision")
    assert (vision.model_name, vision.pretrained, vision.image_size) == ("ViT-L-14", "datacomp_xl_s13b_b90k", 224)
    assert cfg.dataset == "tvl" and cfg.encoders["touch"] == "tvl-touch-vit-tiny" and cfg.image_size == 224
    assert (cfg.model.n_registers, cfg.model.n_shared, cfg.model.hidden_dim) == (32, 8, 512)


# ----------------------------------------------------------------------------------------------
# TVL prepared as TVL prepares it

def write(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return str(path)


def test_vision_crop_is_tvls_for_ssvtp_and_hct(tmp_path):
    side = math.ceil(math.sqrt(2) * 0.18 * 300)  # the crop of a 300 px image: 77 px
    image = np.zeros((300, 300, 3), np.uint8)
    image[..., 1] = 255  # green outside the crops
    start = 150 - side // 2  # torchvision's centre crop starts at round((300 - 77) / 2) = 112 = 150 - 38
    image[start:start + side, start:start + side] = (255, 0, 0)  # SSVTP: the centred square
    image[0:side, (300 - side) // 2:(300 - side) // 2 + side] = (0, 0, 255)  # HCT: the top-centre square
    path = write(tmp_path / "rgb.png", Image.fromarray(image))
    ssvtp, hct = data.tvl_vision(path, 16, "ssvtp"), data.tvl_vision(path, 16, "data1")
    # away from the border pixels, which bilinear resizing blends with the neighbours
    assert torch.allclose(ssvtp[:, 2:-2, 2:-2], torch.tensor([1.0, 0, 0]).view(3, 1, 1))
    assert torch.allclose(hct[:, 2:-2, 2:-2], torch.tensor([0, 0, 1.0]).view(3, 1, 1))
    tall = np.zeros((400, 300, 3), np.uint8)
    tall[200:200 + 102, 99:99 + 102] = 255  # data3 is cropped 200 px from the top: a 102 px crop of 400 px
    assert data.tvl_vision(write(tmp_path / "data3.png", Image.fromarray(tall)), 16, "data3")[:, 2:-2, 2:-2].min() == 1


def test_touch_is_padded_to_a_square_and_rotated_counter_clockwise(tmp_path):
    image = np.full((24, 40, 3), 128, np.uint8)  # 40 wide, 24 high
    image[:4, :4] = (255, 0, 0)  # a red mark in the top-left corner
    out = data.tvl_touch(write(tmp_path / "tac.png", Image.fromarray(image)), 40)
    # padded with 8 black rows above and below, then turned 90° counter-clockwise: the bands become the left
    # and right 8 columns, and the top-left mark lands at the bottom-left, just right of the band
    assert out[:, :, :8].max() == 0 and out[:, :, -8:].max() == 0
    assert torch.allclose(out[:, -3:, 9:11], torch.tensor([1.0, 0, 0]).view(3, 1, 1), atol=1 / 255)
    assert torch.allclose(out[:, 18:22, 20], torch.full((3, 4), 128 / 255), atol=1 / 255)


def test_background_subtraction_leaves_the_imprint_signed(tmp_path):
    background = np.full((32, 32, 3), 180, np.uint8)
    touch = background.copy()
    touch[8:24, 8:24] -= 60  # the imprint darkens the gel
    out = data.tvl_touch(write(tmp_path / "t.png", Image.fromarray(touch)), 32,
                         write(tmp_path / "bg.png", Image.fromarray(background)))
    assert out.min() == pytest.approx(-60 / 255, abs=1e-5) and out.max() == pytest.approx(0, abs=1e-5)


def test_tvl_dataset_reads_both_subsets_with_tvls_split(tvl_dir):
    train_set, val_set, test_set = (data.TVLDataset(tvl_dir, s, {"vision": 16, "touch": 24}) for s in ("train", "val", "test"))
    ssvtp = lambda ds: [r["vision"] for r in ds.rows if r["subset"] == "ssvtp"]  # noqa: E731
    with open(tvl_dir / "ssvtp" / "train.csv") as f:
        urls = [str(tvl_dir / "ssvtp" / r["url"]) for r in csv.DictReader(f)]
    kept, held = train_test_split(urls, train_size=0.9, random_state=42)  # TVL's split of each subset
    assert ssvtp(train_set) == kept and ssvtp(val_set) == held
    assert len(train_set) + len(val_set) == 24 and len(test_set) == 8
    assert not {r["vision"] for r in train_set.rows} & {r["vision"] for r in val_set.rows}
    item = train_set[0]
    assert item["vision"].shape == (3, 16, 16) and item["touch"].shape == (3, 24, 24)
    first = train_set.rows[0]["vision"].split("image_")[1].split("_")[0]
    assert item["caption"] == (tvl_dir / "ssvtp" / "text" / f"labels_{first}.txt").read_text().splitlines()[0]
    assert {r["subset"] for r in test_set.rows} == {"ssvtp", "data1", "data2", "data3"}
    assert train_set.factor_table()["caption"].shape == (len(train_set),)


def test_missing_and_unreadable_files_are_named_or_skipped_with_one_warning(tvl_dir, tmp_path):
    import shutil
    root = shutil.copytree(tvl_dir, tmp_path / "copy")
    (root / "hct" / "data1" / "test" / "tactile" / "1.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="data1/test/tactile/1.jpg does not exist.*skip_missing=True"):
        data.TVLDataset(root, "test")
    corrupt = root / "hct" / "data2" / "test" / "vision" / "3.jpg"
    corrupt.write_bytes(b"not a jpeg")
    (root / "ssvtp" / "text" / "labels_13.txt").unlink()  # the first SSVTP test pair's caption
    with pytest.warns(UserWarning) as caught:
        ds = data.TVLDataset(root, "test", skip_missing=True)
    assert [str(w.message) for w in caught] == [
        f"TVL test under {root}: skipped 3 of 8 rows whose files are missing or unreadable (skip_missing=True)"]
    assert len(ds) == 5 and str(corrupt) not in {r["vision"] for r in ds.rows}
    (root / "ssvtp" / "text" / "labels_13.txt").write_text("soft\n")
    (root / "hct" / "data1" / "test" / "tactile" / "1.jpg").write_bytes(corrupt.read_bytes())
    strict = data.TVLDataset(root, "test")  # files exist: a corrupt one is found when it is read
    index = next(i for i, r in enumerate(strict.rows) if r["vision"] == str(corrupt))
    with pytest.raises(ValueError, match="data2/test/vision/3.jpg is corrupt"):
        strict[index]


def test_a_layout_whose_vision_and_touch_folders_are_swapped_is_refused(tvl_dir, tmp_path):
    """TVL's first public release had folders of camera frames and touch frames swapped: a touch frame lies near its
    sensor's bare-gel image, a camera frame far from it, and the rows where that is the other way round are named."""
    import shutil
    root = shutil.copytree(tvl_dir, tmp_path / "copy")
    hct = root / "hct" / "data2" / "train"
    (hct / "vision").rename(hct / "camera")
    (hct / "tactile").rename(hct / "vision")
    (hct / "camera").rename(hct / "tactile")
    words = (r"TVL train under .*copy: the vision and touch images look swapped in 1 of the 4 folders checked "
             r"\(\['.*data2/train/vision'\]\): the vision image .*data2/train/vision/\d+.jpg is nearer the touch "
             r"sensor's bare-gel image .*data2/background/background.jpg .*Swap those folders")
    with pytest.raises(ValueError, match=words):
        data.TVLDataset(root, "train")
    with pytest.raises(ValueError, match=words):  # the command line stops before it writes anything
        train.main(["--datasets_dir", str(root), "--output_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
    assert len(data.TVLDataset(root, "test")) == 8  # the test split's folders are as TVL lays them out


# ----------------------------------------------------------------------------------------------
# Your own data: a folder of CSV files, phase 1 and phase 2 from the command line

@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    """vision + caption: 120 of scikit-learn's digits (train.csv 96 rows, test.csv 24, no val.csv)."""
    return data.write_digits_csv(tmp_path_factory.mktemp("digits"), image_size=16, n=120)


@pytest.fixture(scope="module")
def synth_csv_dir(tmp_path_factory):
    """vision + touch + caption, with all three split files."""
    splits = {split: [data.SynthTouch(n, image_size=16, split=split)[i] for i in range(n)]
              for split, n in (("train", 64), ("val", 16), ("test", 16))}
    return data.write_csv_dataset(tmp_path_factory.mktemp("synth-csv"), splits)


def test_csv_splits_follow_the_files_or_a_fixed_split(digits_dir, synth_csv_dir):
    sets = {s: data.CSVDataset(digits_dir, s, 16) for s in ("train", "val", "test")}
    assert {s: len(d) for s, d in sets.items()} == {"train": 86, "val": 10, "test": 24}  # val: 10% of train.csv
    assert not {r["vision"] for r in sets["train"].rows} & {r["vision"] for r in sets["val"].rows}
    assert [r["vision"] for r in data.CSVDataset(digits_dir, "val", 16).rows] == [r["vision"] for r in sets["val"].rows]
    item = sets["test"][0]
    assert set(item) == {"vision", "caption", "factors", "index"} and item["vision"].shape == (3, 16, 16)
    assert item["caption"].startswith("a handwritten digit ")
    assert data.csv_modalities(digits_dir) == ("vision", "text")
    assert data.csv_modalities(synth_csv_dir) == ("vision", "touch", "text")
    assert len(data.CSVDataset(synth_csv_dir, "val", 16)) == 16


def test_csv_errors_name_the_file(digits_dir, tmp_path):
    (tmp_path / "train.csv").write_text("image,label\na.png,1\n")
    with pytest.raises(ValueError, match=r"train.csv has columns \['image', 'label'\]; a dataset needs at least two"):
        data.csv_modalities(tmp_path)
    (tmp_path / "train.csv").write_text("vision,caption\nmissing.png,a cat\n")
    with pytest.raises(FileNotFoundError, match="missing.png does not exist"):
        data.CSVDataset(tmp_path, "train")


@pytest.mark.parametrize("which", ["digits", "synth"])
def test_csv_route_trains_phase_1_and_phase_2_from_the_command_line(which, digits_dir, synth_csv_dir, in_tmp):
    folder = {"digits": digits_dir, "synth": synth_csv_dir}[which]
    cfg, _ = train.parse_args(["--datasets_dir", str(folder)])
    assert cfg.dataset == "csv" and cfg.model.modalities == data.csv_modalities(folder)
    train.main(["--datasets_dir", str(folder), "--output_dir", "runs/p1", "--epochs", "1", "--batch_size", "16",
                "--set", "model.hidden_dim=32", "model.n_layers=1", "warmup_steps=2"])
    table = evaluate.read_eval(in_tmp / "runs" / "p1" / "eval.json")
    assert {"vision->text R@1 caption", "chance@1 caption"} <= set(table.columns)
    # no --modalities: the decoder captions from the image modalities the phase-1 run has
    L.main(["--phase1_run", "runs/p1", "--output_dir", "runs/p2", "--epochs", "1", "--batch_size", "16", "--k", "2",
            "--min_steps", "0"])
    rows = json.loads((in_tmp / "runs" / "p2" / "caption_eval.json").read_text())["rows"]
    image_modalities = [m for m in cfg.model.modalities if m != "text"]
    assert {r["modalities"] for r in rows} - {"none"} <= {"+".join(image_modalities), *image_modalities}
    assert {"bleu4", "cider_d", "caption accuracy"} <= set(rows[-1])
    # SynthTouch's captions are adjective lists, the digits' are sentences
    assert ("adjective f1" in rows[-1]) == (which == "synth")


# ----------------------------------------------------------------------------------------------
# Metrics that hold when captions repeat

def test_caption_level_hits_count_any_item_with_the_same_caption():
    codes = layouts._caption_codes(["a", "a", "b", "b", "c", "c"])
    relevant = retrieval.factor_match({"caption": codes}, ["caption"])
    similarity = torch.eye(6)[[1, 0, 3, 2, 5, 4]]  # every query retrieves the other item of its caption
    assert retrieval.recall_at(similarity, torch.eye(6, dtype=torch.bool))[1] == 0
    assert retrieval.recall_at(similarity, relevant)[1] == 1
    assert retrieval.chance_recall(relevant)[1] == pytest.approx(2 / 6)  # 2 of 6 gallery items share a caption


def test_tokenize_as_coco_does_for_plain_captions():
    assert tokenize("A Soft, smooth surface.") == "a soft smooth surface"
    assert tokenize("well-known; it's (hard)! Don't...") == "well-known it 's hard do n't"


def test_caption_accuracy_and_per_adjective_scores_by_hand():
    references = ["soft, smooth", "hard, rough", "soft, rough"]
    captions = ["Smooth and soft.", "hard, smooth", "soft, rough"]
    assert exact_match(captions, references) == pytest.approx(1 / 3)  # order differs in the first: not exact
    assert is_adjective_list(references) and not is_adjective_list(["a handwritten digit one"])
    scores = adjective_scores(captions, references)
    per = scores["per adjective"]
    # smooth: named twice, right once; in one reference, found -> precision 1/2, recall 1
    assert per["smooth"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3)}
    # rough: named once, right; in two references -> precision 1, recall 1/2
    assert per["rough"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3)}
    assert scores["adjective recall"] == pytest.approx((1 + 1 + 1 + 0.5) / 4)


def test_bleu4_with_several_references_uses_the_closest_length():
    # candidate 4 words; references of 3 and 7 words: the closest is 3, so no brevity penalty, and every
    # n-gram of "a b c d" is in the second reference: BLEU-4 = 1
    assert bleu4(["a b c d"], [["x y z", "a b c d e f g"]]) == pytest.approx(1.0)
