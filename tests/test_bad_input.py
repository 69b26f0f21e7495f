"""Every bad input, in one table: each gives one error whose words name the value, the file where there is
one, and the fix. A case is (what the user does, the exception, a regex of the words the message must hold).
Nothing already trained is touched by a refused command (checked for the cases that meet a trained run)."""
import contextlib
import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import data
import demo
import llm_integration as L
import loop
import phase1
import train
import workbook
from conftest import TINY, make_mm, tiny
from encoders import create_encoder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(one_thread, cache_dir, tmp_path_factory):
    """A finished tiny phase-1 run: the commands below must refuse to damage it."""
    return train.train(tiny(cache_dir, tmp_path_factory.mktemp("trained") / "run", epochs=1))


def damaged_copy(trained, tmp_path, file):
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy, symlinks=True)
    target = (copy / "checkpoint").resolve() / file
    target.write_bytes(target.read_bytes()[:100])  # what a full disk or a kill during a copy leaves
    return copy


def flags_of(trained, *extra):
    cfg = phase1.load_config(trained / "config.yaml")
    return ["--output_dir", str(trained), "--epochs", str(cfg.epochs), "--batch_size", str(cfg.batch_size),
            "--set", f"cache_dir={cfg.cache_dir}",
            *(f"{k}={v}" for k, v in TINY.items() if k not in ("epochs", "batch_size")),
            *extra]  # a flag given twice: the later one wins


def yaml_file(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


def tvl_with_header(tmp_path, header):
    """A TVL-layout folder whose HCT train.csv has another first line."""
    folder = data.write_tvl_layout(tmp_path / "tvl", {"train": data.SynthTouch(6, image_size=32),
                                                      "test": data.SynthTouch(4, seed=1, image_size=32)}, 32)
    table = folder / "hct" / "data1" / "train.csv"
    lines = table.read_text().splitlines()
    table.write_text("\n".join([header] + lines[1:]) + "\n")
    return folder


def other_vit_weights(tmp_path, **timm_kwargs):
    """A timm ViT's weights saved as safetensors, from another architecture than the synth-touch encoder."""
    import timm
    from safetensors.torch import save_file
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=128, global_pool="avg",
                            img_size=64, **{"patch_size": 8, "depth": 2, **timm_kwargs})
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    return str(tmp_path / "vit.safetensors")


def csv_with_vision_path(tmp_path, where):
    """A two-row CSV dataset whose first vision path is replaced by one that leads out of the folder (`where`)."""
    folder = data.write_csv_dataset(tmp_path / "mine", {"train": [
        {"vision": torch.rand(3, 8, 8), "caption": f"photo {i}"} for i in range(2)]})
    secret = tmp_path / "secret.png"
    shutil.copy(folder / "images" / "train_0_vision.png", secret)  # a real image: only its place is wrong
    if where == "link":
        (folder / "images" / "link.png").symlink_to(secret)
    path = {"absolute": str(secret), "..": "../secret.png", "link": "images/link.png"}[where]
    table = folder / "train.csv"
    table.write_text(table.read_text().replace("images/train_0_vision.png", path))
    return folder


def csv_with_header(tmp_path, header, extra_row=None, encoding="utf-8"):
    """A two-row CSV dataset whose first line is `header` (and a third line `extra_row`), in `encoding`."""
    folder = data.write_csv_dataset(tmp_path / "mine", {"train": [
        {"vision": torch.rand(3, 8, 8), "caption": f"photo {i}"} for i in range(2)]})
    lines = (folder / "train.csv").read_text().splitlines()
    rows = [line + (",extra" if header.count(",") == 2 else "") for line in lines[1:]]
    (folder / "train.csv").write_text("\n".join([header, *rows, *([extra_row] if extra_row else [])]) + "\n",
                                      encoding=encoding)
    return folder


def file_in(folder, name):
    (folder / name).write_text("a file where a folder is asked for")
    return folder / name


def csv_dataset(folder, **flags):
    return data.CSVDataset(folder, image_size=8, **flags)


def csv_with_test_rows_in_train(tmp_path, given):
    """A CSV dataset whose test rows are training rows: test.csv a copy of train.csv (`given`), or train.csv with
    every row four times, so that the carved test split repeats training rows."""
    folder = data.write_csv_dataset(tmp_path / "mine", {"train": [
        {"vision": torch.rand(3, 8, 8), "caption": f"photo {i}"} for i in range(4)]})
    table = folder / "train.csv"
    if given:
        shutil.copy(table, folder / "test.csv")
    else:
        header, *rows = table.read_text().splitlines()
        table.write_text("\n".join([header, *rows * 4]) + "\n")
    return folder


def float_tiff(tmp_path, value):
    import numpy as np
    from PIL import Image
    Image.fromarray(np.full((8, 8), value, np.float32), mode="F").save(tmp_path / "float.tif")
    return tmp_path / "float.tif"


def phase2_flags(trained, tmp_path, *extra):
    return ["--phase1_run", str(trained), "--output_dir", str(tmp_path / "p2"), *extra]


CASES = {
    # --- configs and flags
    "--batch_size 0": (lambda t, p: train.parse_args(["--batch_size", "0"]),
                       ValueError, r"batch_size must be a positive integer, got 0.*--batch_size 64"),
    "--epochs 0": (lambda t, p: train.parse_args(["--epochs", "0"]),
                   ValueError, r"epochs must be a positive integer, got 0"),
    "--epochs -2 (phase 2)": (lambda t, p: L.load_llm_config(None, epochs=-2),
                              ValueError, r"epochs must be a positive integer, got -2.*phase-2"),
    "--lr 0": (lambda t, p: train.parse_args(["--lr", "0"]), ValueError, r"lr must be positive, got 0"),
    "--set model.hidden_dim=abc": (lambda t, p: train.parse_args(["--set", "model.hidden_dim=abc"]),
                                   ValueError, r"model.hidden_dim must be an integer, got 'abc' given as an "
                                               r"override; e.g. model.hidden_dim: 64"),
    "--set n_val=0": (lambda t, p: train.parse_args(["--set", "n_val=0"]),
                      ValueError, r"n_val must be at least 1.*default.yaml"),
    "--set n_trian=5": (lambda t, p: train.parse_args(["--set", "n_trian=5"]),
                        ValueError, r"unknown config keys \['n_trian'\] given as an override; known: .*n_train"),
    "YAML typo in a key": (lambda t, p: phase1.load_config(yaml_file(p, "model:\n  n_sahred: 3\n")),
                           ValueError, r"unknown model keys \['n_sahred'\] in .*bad.yaml; known: .*n_shared"),
    "YAML syntax error": (lambda t, p: phase1.load_config(yaml_file(p, "model:\n  n_shared: [4\n")),
                          ValueError, r"bad.yaml is not valid YAML at line 3, column 1: expected ',' or '\]'.*fix that line"),
    "YAML list that is not a mapping": (lambda t, p: phase1.load_config(yaml_file(p, "- 1\n- 2\n")),
                                        ValueError, r"bad.yaml must hold `key: value` lines"),
    "YAML boolean for a number": (lambda t, p: phase1.load_config(yaml_file(p, "lr: yes\n")),
                                  ValueError, r"lr must be a number, got 'yes' in .*bad.yaml"),
    "YAML 1.1 base-60 number": (lambda t, p: phase1.load_config(yaml_file(p, "epochs: 1:30\n")),
                                ValueError, r"epochs must be an integer, got '1:30' in .*bad.yaml; e.g. epochs: 64"),
    "--loss_type clip": (lambda t, p: train.parse_args(["--loss_type", "clip"]),
                         ValueError, r"unknown loss_type 'clip'; choose one of .*contrastive"),
    "--loss_type flow_matching alone": (lambda t, p: train.parse_args(["--loss_type", "flow_matching"]),
                                        ValueError, r"'flow_matching' on its own does not align.*--loss_type combined"),
    "missing --config file": (lambda t, p: train.parse_args(["--config", str(p / "nope.yaml")]),
                              FileNotFoundError, r"nope.yaml not found; see configs/"),
    "--set without =": (lambda t, p: train.parse_args(["--set", "hidden_dim"]), SystemExit, r"KEY=VALUE"),
    "--set model.embed_dim=0": (lambda t, p: train.parse_args(["--set", "model.embed_dim=0"]),
                                ValueError, r"model.embed_dim must be a positive integer, got 0; e.g. model.embed_dim"),
    "--set model.n_heads=0": (lambda t, p: train.parse_args(["--set", "model.n_heads=0"]),
                              ValueError, r"model.n_heads must be a positive integer, got 0"),
    "duplicated modalities": (lambda t, p: train.parse_args(["--set", "model.modalities=[vision, vision]"]),
                              ValueError, r"modalities \['vision', 'vision'\] name one twice"),
    "--set grad_clip=0": (lambda t, p: train.train(phase1.load_config(None, output_dir=str(p), grad_clip=0)),
                          ValueError, r"grad_clip must be positive, got 0.0 \(phase-1 config\)"),
    "--set weight_decay=-0.1": (lambda t, p: train.train(phase1.load_config(None, output_dir=str(p), weight_decay=-0.1)),
                                ValueError, r"weight_decay must be 0 or more, got -0.1"),
    "--set of one key twice": (lambda t, p: train.parse_args(["--set", "lr=0.1", "--set", "lr=0.2"]),
                               SystemExit, r"--set lr is given twice \(0.1 and '0.2'\).*keep one"),
    "YAML key given twice": (lambda t, p: phase1.load_config(yaml_file(p, "lr: 0.1\nepochs: 3\nlr: 0.2\n")),
                             ValueError, r"bad.yaml is not valid YAML at line 3, column 1: key 'lr' is given twice"),
    "--set encoders.smell=x": (lambda t, p: train.parse_args(["--set", "encoders.smell=x"]),
                               ValueError, r"encoders must map modalities among .*'smell': 'x'.*encoders.vision="),
    "--set inside an encoder given by name": (
        lambda t, p: train.parse_args(["--set", "encoders.vision.weights=w.pt"]),
        ValueError, r"encoders.vision is 'synth-vision', not a mapping.*--set 'encoders.vision=\{name: synth-vision, "
                    r"weights: FILE\}'"),
    "two flags of one key": (lambda t, p: train.parse_args(["--n_shared", "2", "--num_overlapping_tokens", "3"]),
                             SystemExit, r"--n_shared and --num_overlapping_tokens both set model.n_shared \(2 and 3\)"),
    "--resume with --overwrite": (lambda t, p: train.parse_args(["--resume", "--overwrite"]),
                                  SystemExit, r"pass one of them"),
    # --- run folders and checkpoints
    "fresh run into a trained folder": (lambda t, p: train.main(flags_of(t)),
                                        FileExistsError, r"already holds a run .*--resume.*--output_dir.*--overwrite"),
    "resume with more epochs": (lambda t, p: train.main(flags_of(t, "--resume", "--epochs", "3")),
                                ValueError, r"differences \(saved, requested\): {'epochs': \(1, 3\)}.*cannot be extended"),
    "resume with another lr": (lambda t, p: train.main(flags_of(t, "--resume", "--lr", "0.5")),
                               ValueError, r"cannot resume .*'lr': \(0.001, 0.5\)"),
    "resume where nothing ran": (lambda t, p: train.train(phase1.load_config(None, output_dir=str(p)), resume=True),
                                 FileNotFoundError, r"nothing to resume in .*drop --resume"),
    "truncated model.safetensors": (lambda t, p: phase1.load_aligner(damaged_copy(t, p, "model.safetensors")),
                                    ValueError, r"copy/checkpoint-\d+/model.safetensors is damaged or truncated.*"
                                                r"--overwrite"),
    "truncated state.pt": (lambda t, p: train.train(phase1.load_config(damaged_copy(t, p, "state.pt") / "config.yaml",
                                                                     output_dir=str(p / "copy")), resume=True),
                           ValueError, r"copy/checkpoint-\d+/state.pt is damaged or truncated"),
    "weights of a bigger model": (lambda t, p: loop.load_trainable(
                                      phase1.build_model(phase1.load_config(t / "config.yaml", **{"model.n_layers": 2})),
                                      loop.RunFolder(t).load_weights(), loop.RunFolder(t)),
                                  ValueError, r"does not fit the model built:.*missing tensors \['encoders.touch."
                                              r"blocks.1.*saved from another model config than the one built: build "
                                              r"the model from .*config.yaml"),
    "weights of a smaller model": (lambda t, p: loop.load_trainable(
                                       phase1.build_model(phase1.load_config(t / "config.yaml", **{"model.n_registers": 2})),
                                       loop.RunFolder(t).load_weights(), loop.RunFolder(t)),
                                   ValueError, r"shape mismatches \['decoders.touch|shape mismatches \['encoders"),
    "--phase1_run that does not exist": (lambda t, p: L.main(["--phase1_run", str(p / "no-run"), "--output_dir",
                                                              str(p / "out")]),
                                         FileNotFoundError, r"no-run is not a phase-1 run folder .*--output_dir of"),
    "a Qwen decoder that is not downloaded": (lambda t, p: L.load_decoder("Qwen/Qwen2.5-0.5B-Instruct",
                                                                           local_files_only=True),
                                              OSError, r"cannot load the decoder 'Qwen/Qwen2.5-0.5B-Instruct'.*pass "
                                                       r"--model_name .*local folder"),
    # --- data
    "TVL CSV with another header": (lambda t, p: data.TVLDataset(tvl_with_header(p, "image,touch,bg,text"),
                                                                  image_size=32),
                                    ValueError, r"data1/train.csv has the header \['image', 'touch', 'bg', 'text'\] but "
                                                r"TVL's layout needs the columns .*fix its first line"),
    "timm weights of a deeper ViT": (lambda t, p: create_encoder("synth-touch",
                                                                      weights=other_vit_weights(p, depth=12)),
                                     ValueError, r"vit.safetensors does not fit timm.*unexpected tensors \['blocks.10"
                                                 r".*--stage1_checkpoint"),
    "open_clip weights of another model": (lambda t, p: create_encoder("synth-vision",
                                                                             weights=other_vit_weights(p)),
                                            RuntimeError, r"weights file .*vit.safetensors does not load into open_clip "
                                                          r"'FlexAlign-ViT-Tiny'.*Pass the model name the file was saved"),
    "timm weights of another patch size": (lambda t, p: create_encoder("synth-touch",
                                                                            weights=other_vit_weights(p, patch_size=16)),
                                           ValueError, r"does not fit timm.*shape mismatches \['patch_embed"),
    "CSV row with an absolute path": (lambda t, p: csv_dataset(csv_with_vision_path(p, "absolute")),
                                      ValueError, r"train.csv: the row 'photo 0' names .*secret.png, which lies outside "
                                                  r"the dataset folder .*paths_outside_dataset=true"),
    "CSV row with ../": (lambda t, p: csv_dataset(csv_with_vision_path(p, "..")),
                         ValueError, r"names .*mine/\.\./secret.png, which lies outside the dataset folder"),
    "CSV row through a link out": (lambda t, p: csv_dataset(csv_with_vision_path(p, "link")),
                                   ValueError, r"names .*images/link.png, which lies outside the dataset folder"),
    "log_name out of output_dir": (lambda t, p: train.parse_args(["--log_name", "../../elsewhere"]),
                                   ValueError, r"log_name '\.\./\.\./elsewhere' must name a sub-folder inside "
                                               r"output_dir"),
    "CSV whose captions are all empty": (lambda t, p: csv_dataset(data.write_csv_dataset(p / "mine", {"train": [
        {"vision": torch.rand(3, 8, 8), "caption": ""} for _ in range(3)]})),
                                         ValueError, r"mine/train.csv: every caption is empty.*fill the caption column"),
    "--set model.preservation_weight=-1": (lambda t, p: train.parse_args(["--set", "model.preservation_weight=-1"]),
                                           ValueError, r"model.preservation_weight must be 0 \(off\) or more, got -1"),
    "--set model.nested_dropout_rate=1.5": (lambda t, p: train.parse_args(["--set", "model.nested_dropout_rate=1.5"]),
                                            ValueError, r"nested_dropout_rate=1.5 is the drop probability"),
    "--set model.decoder_layers=0": (lambda t, p: train.parse_args(["--set", "model.decoder_layers=0"]),
                                     ValueError, r"model.decoder_layers must be a positive integer, got 0"),
    "--set model.mrl_dims=[16,16]": (lambda t, p: train.parse_args(["--set", "model.mrl_dims=[16,16]"]),
                                     ValueError, r"mrl_dims \[16, 16\] names a width twice"),
    "--set model.init_temperature=0": (lambda t, p: train.parse_args(["--set", "model.init_temperature=0"]),
                                       ValueError, r"init_temperature must be positive, got 0"),
    "--set warmup_steps=-5": (lambda t, p: train.parse_args(["--set", "warmup_steps=-5"]),
                              ValueError, r"warmup_steps must be an integer of at least 0, got -5"),
    "--seed -3": (lambda t, p: train.parse_args(["--seed", "-3"]), ValueError, r"seed must be an integer of at least 0"),
    "CSV naming a column twice": (lambda t, p: csv_dataset(csv_with_header(p, "vision,caption,caption")),
                                  ValueError, r"train.csv names the columns \['caption'\] more than once"),
    "CSV row with too few fields": (lambda t, p: csv_dataset(csv_with_header(p, "vision,caption", "images/x.png")),
                                    ValueError, r"train.csv, line 4: 1 fields where the header has 2"),
    "CSV in Latin-1": (lambda t, p: csv_dataset(csv_with_header(p, "vision,caption", "images/x.png,caf\xe9", "latin-1")),
                       ValueError, r"train.csv is not UTF-8 text .*save it as CSV UTF-8"),
    "--set with a YAML tag": (lambda t, p: train.parse_args(["--set", "lr=!!python/object:os.system x"]),
                              SystemExit, r"--set 'lr=!!python/object:os.system x': the value is not plain YAML"),
    "output_dir that is a file": (lambda t, p: train.train(tiny(p, file_in(p, "taken"))),
                                  FileExistsError, r"output_dir .*taken is a file, not a folder; choose another"),
    "cache_dir under a file": (lambda t, p: train.train(tiny(file_in(p, "taken") / "features", p / "run")),
                               FileExistsError, r"cache_dir .*taken/features cannot be a folder: .*taken is a file"),
    "cache_dir the run folder": (lambda t, p: train.parse_args(["--output_dir", str(p / "run"), "--set",
                                                                f"cache_dir={p / 'run'}"]),
                                 ValueError, r"cache_dir '.*run' lies in the run folder .*run, which holds only what a "
                                             r"run writes.*e.g. cache_dir: cache/features"),
    "--datasets_dir without data": (lambda t, p: train.train(train.parse_args(["--datasets_dir", str(p),
                                                                               "--output_dir", str(p / "o")])[0]),
                                    FileNotFoundError, r"no TVL train.csv with rows found under"),
    "--lr 1e3 (a slip for 1e-3)": (lambda t, p: train.parse_args(["--lr", "1e3"]),
                                   ValueError, r"lr 1000.0 is above 1.0 \(phase-1 config\).*1e3 for 1e-3.*--lr 1e-3"),
    "alias and flag of one key": (lambda t, p: train.parse_args(["--num_register_tokens", "8", "--n_registers", "4"]),
                                  SystemExit, r"--n_registers and --num_register_tokens both set model.n_registers"),
    "--batch_size 1": (lambda t, p: train.parse_args(["--batch_size", "1"]),
                       ValueError, r"batch_size 1 leaves the contrastive loss no other sample.*--batch_size 64"),
    "encoders={}": (lambda t, p: train.parse_args(["--set", "encoders={}"]),
                    ValueError, r"encoders \{\} has no encoder for \['vision', 'touch'\].*encoders.vision=synth-vision"),
    "--output_dir ''": (lambda t, p: train.parse_args(["--output_dir", ""]),
                        ValueError, r"output_dir '' names no folder of its own.*--output_dir runs/phase1/mine"),
    "--output_dir .": (lambda t, p: train.parse_args(["--output_dir", "."]), ValueError, r"output_dir '\.' names no folder"),
    "NUL byte in log_name": (lambda t, p: train.parse_args(["--set", 'log_name="a\\0b"']),
                             ValueError, r"log_name 'a\\x00b' holds a NUL byte"),
    "--datasets_dir that is a file": (lambda t, p: train.parse_args(["--datasets_dir", str(file_in(p, "train.csv"))]),
                                      ValueError, r"datasets_dir .*train.csv is a file; pass the folder that holds"),
    "--config that is a folder": (lambda t, p: train.parse_args(["--config", str(p)]),
                                  FileNotFoundError, r"config file .* is a folder, not a YAML file; see configs/"),
    "config saved as UTF-16": (lambda t, p: phase1.load_config(yaml_file(p, "").write_text("epochs: 3\n", "utf-16") and
                                                               p / "bad.yaml"),
                               ValueError, r"bad.yaml is not UTF-8 text .*save it as UTF-8"),
    "phase 2 max_new_tokens 0": (lambda t, p: L.main(phase2_flags(t, p, "--max_new_tokens", "0")),
                                 ValueError, r"max_new_tokens must be at least 1, got 0 \(phase-2 config\)"),
    "phase 2 lora_r 0": (lambda t, p: L.main(phase2_flags(t, p, "--set", "lora_r=0")),
                         ValueError, r"lora_r must be at least 1, got 0.*lora_r: 16"),
    "phase 2 cpu_threads -1": (lambda t, p: L.main(phase2_flags(t, p, "--set", "cpu_threads=-1")),
                               ValueError, r"cpu_threads must be at least 0, got -1"),
    "phase 2 --seeds 0 0": (lambda t, p: L.main(phase2_flags(t, p, "--seeds", "0", "0")),
                            ValueError, r"seeds \[0, 0\] name \[0\] more than once.*--seeds 0 1 2"),
    "phase 2 --overwrite into its phase-1 run": (
        lambda t, p: L.main(["--phase1_run", str(t), "--output_dir", str(t), "--overwrite"]),
        FileExistsError, r"output_dir .*run holds the phase-1 run --phase1_run names: phase 2 writes a run folder of "
                         r"its own .*--overwrite included; nothing in it was touched. Choose a new --output_dir, e.g. "
                         r"--output_dir .*run-phase2"),
    "workbook --execute a notebook that does not exist": (
        lambda t, p: workbook.main(["--execute", str(p / "nope.py"), "--out", str(p / "wb")]),
        FileNotFoundError, r"--execute .*nope.py: no such file; the notebooks are \[.*'notebooks/01_"),
    "workbook --execute a file that is no notebook": (
        lambda t, p: workbook.main(["--execute", str(workbook.ROOT / "README.md"), "--out", str(p / "wb")]),
        ValueError, r"--execute .*README.md is not a notebook: the workbook's are jupytext .py files.*notebooks/01_"),
    "workbook --out a file": (lambda t, p: workbook.main(["--execute", str(workbook.notebook_paths()[0]), "--out",
                                                          str(file_in(p, "wb"))]),
                              FileExistsError, r"--out .*wb cannot be a folder: .*wb is a file; choose another --out"),
    "make demo --out a file": (lambda t, p: demo.main(["--out", str(file_in(p, "wb")), "--only", "01"]),
                               FileExistsError, r"--out .*wb cannot be a folder: .*wb is a file; choose another --out"),
    "--model_name folder that does not exist": (lambda t, p: L.load_decoder(str(p / "nodec")),
                                                FileNotFoundError, r"decoder folder .*nodec does not exist; pass "
                                                                   r"--model_name a folder that save_pretrained wrote"),
    "--model_name a phase-1 run": (lambda t, p: L.load_decoder(str(t)),
                                   FileNotFoundError, r"decoder folder .* holds no config.json, so it is no saved decoder"),
    "test.csv a copy of train.csv": (lambda t, p: csv_dataset(csv_with_test_rows_in_train(p, True), split="test"),
                                     ValueError, r"test.csv: \d+ of its images are training images too .*remove those "
                                                 r"rows from test.csv"),
    "train.csv repeating its rows": (lambda t, p: csv_dataset(csv_with_test_rows_in_train(p, False), split="test"),
                                     ValueError, r"test.csv: \d+ of its images are training images too .*train.csv "
                                                 r"names those images in several rows"),
    "CSV of one row, its test split asked": (lambda t, p: csv_dataset(data.write_csv_dataset(p / "mine", {"train": [
        {"vision": torch.rand(3, 8, 8), "caption": "photo"}]}), split="test"),
                                             ValueError, r"mine/test.csv: there is no test.csv, so its rows are carved "
                                                         r"from train.csv, which has 1 row: they split into train 1, "
                                                         r"val 0 and test 0 rows; give train.csv at least 3 rows"),
    "CSV row with an empty image cell": (lambda t, p: csv_dataset(csv_with_header(p, "vision,caption", ",photo 9"),
                                                                  split="test"),
                                         ValueError, r"mine/train.csv, line 4: the vision cell is empty; fill in the "
                                                     r"image's path .*delete the line, or pass skip_missing=True"),
    "CSV row naming a folder": (lambda t, p: csv_dataset(csv_with_header(p, "vision,caption", "images,photo 9")),
                                ValueError, r"mine/train.csv, line 4: vision 'images' is the folder .*mine/images, not "
                                            r"an image file; fill in the image's path"),
    "CSV row of commas only": (lambda t, p: csv_dataset(csv_with_header(p, "vision,caption", ",")),
                               ValueError, r"mine/train.csv, line 4 holds commas and no values \(a spreadsheet writes "
                                           r"such rows for cells it cleared\); .*delete the line"),
    "float image beyond 0-255": (lambda t, p: data.load_image(float_tiff(p, -3), 8),
                                 ValueError, r"image .*float.tif is a float image with values in \[-3, -3\]"),
    "--stage1_checkpoint that does not exist": (
        lambda t, p: phase1.get_encoder(train.parse_args(["--stage1_checkpoint", str(p / "stage1.pth")])[0], "touch"),
        FileNotFoundError, r"stage1.pth.*does not exist"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_clear_error(case, trained, tmp_path):
    action, error, words = CASES[case]
    before = sorted(p.name for p in trained.iterdir()), (trained / "metrics.jsonl").read_text()
    with pytest.raises(error, match=words):
        action(trained, tmp_path)
    assert (sorted(p.name for p in trained.iterdir()), (trained / "metrics.jsonl").read_text()) == before


# ----------------------------------------------------------------------------------------------
# images and prompts given to a trained captioner

def image_cases():
    good = torch.rand(2, 3, 64, 64)
    return {
        "uint8 images": ((good * 255).to(torch.uint8), r"images are torch.uint8.*images.float\(\) / 255"),
        "0-255 float images": (good * 255, r"range over \[.*, 25\d\].*divide 0–255 images by 255"),
        "normalised images": ((good - 0.5) / 0.05, r"range over .*do not normalise them first"),
        "grayscale images": (good[:, :1], r"B×3×H×W in \[0, 1\], got \(2, 1, 64, 64\).*RGB"),
        "wrong size": (torch.rand(2, 3, 32, 32), r"32, 32\) pixels but the vision encoder takes 64×64"),
    }


@pytest.mark.parametrize("case", image_cases())
def test_generate_refuses_images_it_cannot_read(case, aligner, decoder_dir):
    images, words = image_cases()[case]
    with pytest.raises(ValueError, match=words):
        make_mm(aligner, decoder_dir, max_new_tokens=2).generate(list(images))


def test_an_empty_prompt_is_used_as_given_not_replaced(aligner, decoder_dir):
    mm = make_mm(aligner, decoder_dir)
    prefix, mask = torch.zeros(1, 2, mm.hidden), torch.ones(1, 2, dtype=torch.bool)
    empty = mm.assemble(prefix, mask, "")["attention_mask"].shape[1]
    default = mm.assemble(prefix, mask, mm.llm_cfg.prompt)["attention_mask"].shape[1]
    assert empty < default


def test_yaml_numbers_pyyaml_reads_as_strings_are_coerced(tmp_path):
    cfg = phase1.load_config(yaml_file(tmp_path, "lr: 1e-3\nmodel:\n  flow_weight: 5e-1\n"))
    assert cfg.lr == 0.001 and isinstance(cfg.lr, float) and cfg.model.flow_weight == 0.5
    assert train.parse_args(["--set", "lr=1e-3", "n_train=2e3"])[0].n_train == 2000


def test_yaml_reads_plain_values_as_yaml_1_2_means_them(tmp_path):
    """PyYAML's YAML 1.1 reads 010 as octal 8 and no/on as booleans; a config means what YAML 1.2 (and a person)
    reads: 10, and the strings 'no' and 'on' where a string is asked for. yes/no/on/off still set a true-or-false key."""
    cfg = phase1.load_config(yaml_file(tmp_path, "seed: 010\ndata_seed: 0o10\nlog_name: no\nleakage_probes: off\n"))
    assert (cfg.seed, cfg.data_seed, cfg.log_name, cfg.leakage_probes) == (10, 8, "no", False)
    cfg, _ = train.parse_args(["--set", "seed=010", "log_name=on", "cpu_bf16=yes"])
    assert (cfg.seed, cfg.log_name, cfg.cpu_bf16) == (10, "on", True)
    assert L.load_llm_config(yaml_file(tmp_path, "prompt: yes\n")).prompt == "yes"
    # YAML 1.1 reads an unquoted date as a date, which a string key refused; 1.2 has no dates: the text as typed
    assert phase1.load_config(yaml_file(tmp_path, "log_name: 2024-01-01\n")).log_name == "2024-01-01"
    assert train.parse_args(["--set", "log_name=2024-01-01"])[0].log_name == "2024-01-01"


def test_a_float_image_in_0_1_is_seen_as_grey_not_black(tmp_path):
    assert data.load_image(float_tiff(tmp_path, 0.5), 4).mean().item() == pytest.approx(0.5, abs=1 / 255)


def test_a_yaml_merge_key_reads_as_yaml_defines_it(tmp_path):
    cfg = phase1.load_config(yaml_file(tmp_path, "model: &m\n  n_shared: 2\n  n_registers: 4\n"
                                                 "encoders: {vision: synth-vision, touch: synth-touch, text: minilm}\n"))
    assert (cfg.model.n_shared, cfg.model.n_registers) == (2, 4)
    merged = yaml_file(tmp_path, "model:\n  <<: {n_shared: 2, n_registers: 8}\n  n_registers: 4\n")
    assert (phase1.load_config(merged).model.n_shared, phase1.load_config(merged).model.n_registers) == (2, 4)


def test_resume_after_metrics_were_cut_says_which_rows_are_lost_and_keeps_the_run(trained, tmp_path):
    copy = shutil.copytree(trained, tmp_path / "copy", symlinks=True)
    metrics = copy / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes()[:-40])  # half of the epoch row: a cut copy
    weights = (copy / "checkpoint" / "model.safetensors").read_bytes()
    with pytest.warns(UserWarning, match=r"metrics.jsonl lacks the rows of epochs \[0\] \(it was cut.*cannot be made "
                                         r"again.*--overwrite"):
        train.main([flag.replace(str(trained), str(copy)) for flag in flags_of(trained, "--resume")])
    rows = train.read_metrics(copy)
    assert rows == [row for row in train.read_metrics(trained) if row["kind"] == "step"]  # every whole row kept
    assert (copy / "checkpoint" / "model.safetensors").read_bytes() == weights and (copy / "eval.json").is_file()


def test_a_full_disk_during_a_save_keeps_the_last_checkpoint_and_says_so(cache_dir, tmp_path, monkeypatch):
    """The disk fills while the second epoch's checkpoint is written: training stops with one message naming the
    folder, the half-written checkpoint is gone, and the first epoch's loads and resumes."""
    import errno
    saves, real_save = [], torch.save

    def full_disk(obj, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    cfg = tiny(cache_dir, tmp_path / "run")
    with pytest.raises(OSError, match=r"cannot write the checkpoint .*run/checkpoint-00000008 \(\[Errno 28\] No space "
                                      r"left on device.*the disk is full.*checkpoint-00000004\) is kept.*--resume"):
        train.train(cfg)
    monkeypatch.setattr(torch, "save", real_save)
    run = loop.RunFolder(cfg.run_dir)
    assert run.checkpoint_step() == 4 and not (cfg.run_dir / "checkpoint-00000008").exists()
    phase1.load_aligner(cfg.run_dir)
    train.train(cfg, resume=True)
    assert run.trained(cfg.epochs)


def test_replacing_an_image_under_the_same_path_gives_another_feature_cache(tmp_path):
    folder = data.write_tvl_layout(tmp_path / "tvl", {"train": data.SynthTouch(6, image_size=32),
                                                      "test": data.SynthTouch(4, seed=1, image_size=32)}, 32)
    dataset = data.TVLDataset(folder, split="test", image_size=32)
    image, before = Path(dataset.rows[0]["vision"]), dataset.fingerprint
    image.write_bytes(image.read_bytes() + b"\0")  # same path, same row count, other content
    assert data.TVLDataset(folder, split="test", image_size=32).fingerprint != before


def test_set_may_be_repeated_and_every_pair_counts():
    cfg, _ = train.parse_args(["--set", "lr=0.01", "--set", "model.hidden_dim=64", "epochs=3"])
    assert (cfg.lr, cfg.model.hidden_dim, cfg.epochs) == (0.01, 64, 3)


def test_a_run_copied_with_its_links_dereferenced_is_still_that_run(trained, tmp_path):
    """cp -rL, shutil.copytree's default, scp -r and a zip turn the `checkpoint` link into a folder: the copy loads
    the same weights, is refused as a fresh target like the original, and its next save puts the link back."""
    copy = shutil.copytree(trained, tmp_path / "copy")  # symlinks=False: the link becomes a folder
    assert (copy / "checkpoint").is_dir() and not (copy / "checkpoint").is_symlink()
    original, copied = phase1.load_aligner(trained).model, phase1.load_aligner(copy).model
    assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), copied.state_dict().values()))
    cfg = dataclasses.replace(phase1.load_config(copy / "config.yaml"), output_dir=str(copy))
    step = loop.RunFolder(trained).checkpoint_step()
    with pytest.raises(FileExistsError, match=rf"already holds a run \(a checkpoint at step {step}\)"):
        train.train(cfg)
    assert train.ensure_trained(cfg) == copy  # finished: eval.json is there, nothing retrains
    run = loop.RunFolder(copy)
    run.save(step + 1, run.load_weights(), run.load_state())
    assert (copy / "checkpoint").is_symlink() and run.checkpoint_step() == step + 1
    assert sorted(p.name for p in copy.glob("*checkpoint*")) == ["checkpoint", f"checkpoint-{step + 1:08d}"]


def test_weights_with_a_nan_are_refused_on_load(trained, tmp_path):
    from safetensors.torch import load_file, save_file
    copy = shutil.copytree(trained, tmp_path / "copy", symlinks=True)
    weights_file = (copy / "checkpoint").resolve() / "model.safetensors"
    weights = load_file(str(weights_file))
    name = sorted(weights)[0]
    weights[name].view(-1)[0] = float("nan")
    save_file(weights, str(weights_file), metadata={"step": "1"})
    with pytest.raises(ValueError, match=rf"holds NaN or infinite values in \['{name}'"):
        phase1.load_aligner(copy)


def test_a_run_folder_another_process_trains_is_refused_by_every_entry_point(cache_dir, aligner, decoder_dir,
                                                                             tmp_path):
    """Two trainers in one folder would interleave their metrics rows and leave one's weights under the other's
    config. While the folder's lock is held (here by this test, as a trainer would hold it), train.py, the Python
    API of both phases and a phase-2 run are refused at once and write nothing."""
    import concurrent.futures
    import subprocess
    import sys
    target = tmp_path / "run"
    flags = ["--output_dir", str(target), "--set", f"cache_dir={cache_dir}", *(f"{k}={v}" for k, v in TINY.items())]
    mm = make_mm(aligner, decoder_dir, batch_size=4)
    tokens, captions = {"vision": torch.randn(4, 8, 32)}, ["a caption"] * 4
    entry_points = {"phase 1": lambda: train.train(tiny(cache_dir, target)),
                    "phase 2": lambda: L.fit_captioner(mm, tokens, captions, output_dir=target)}
    with loop.RunFolder(target).exclusive() as held, concurrent.futures.ThreadPoolExecutor(1) as other_thread:
        assert held
        cli = subprocess.run([sys.executable, str(Path(train.__file__).with_name("train.py")), *flags],
                             capture_output=True, text=True, timeout=300)
        assert cli.returncode != 0 and f"another process is training {target}" in cli.stderr
        for name, action in entry_points.items():
            with pytest.raises(RuntimeError, match=rf"another process is training {target} \(it holds .*run.lock\)"):
                other_thread.submit(action).result()
        assert not target.exists()


def test_a_dataset_that_points_elsewhere_opens_when_allowed_and_a_bom_header_keeps_its_columns(tmp_path):
    folder = csv_with_vision_path(tmp_path, "absolute")
    table = folder / "train.csv"
    for split in ("val", "test"):  # so that the train split holds both rows
        shutil.copy(table, folder / f"{split}.csv")
    rows = csv_dataset(folder, outside=True).rows  # the opt-in: paths_outside_dataset: true
    assert [row["vision"] for row in rows][0] == str(tmp_path / "secret.png") and len(rows) == 2
    table.write_text("\ufeff" + table.read_text().replace(str(tmp_path / "secret.png"), "images/train_0_vision.png"),
                     encoding="utf-8")  # what Excel's "CSV UTF-8" writes
    assert data.csv_columns(folder) == ["vision", "caption"] and csv_dataset(folder).columns == ["vision", "caption"]
    table.write_text(table.read_text(encoding="utf-8").replace("vision,caption", "vision, caption"), encoding="utf-8")
    assert [row["caption"] for row in csv_dataset(folder).rows] == ["photo 0", "photo 1"]  # ", caption" is caption


def test_what_a_run_folder_holds_that_save_did_not_write_is_never_deleted(trained, tmp_path):
    """A results-only copy (eval.json, no checkpoint), a user's `.tmp/` notes or `checkpoint-best/` beside a run, and
    a `checkpoint` link to another run's weights: none is replaced, deleted or read as this run's."""
    results = tmp_path / "results"
    results.mkdir()
    for name in ("config.yaml", "eval.json", "metrics.jsonl"):
        shutil.copy(trained / name, results / name)
    cfg = dataclasses.replace(phase1.load_config(trained / "config.yaml"), output_dir=str(results))
    with pytest.raises(FileExistsError, match=r"holds the results of a run \(eval.json\) without its checkpoint"):
        train.train(cfg)
    assert (results / "eval.json").read_bytes() == (trained / "eval.json").read_bytes()
    copy = shutil.copytree(trained, tmp_path / "copy", symlinks=True)
    (copy / ".tmp").mkdir()
    (copy / ".tmp" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"not a run of this kind: it holds \['.tmp/'\]"):
        train.train(dataclasses.replace(cfg, output_dir=str(copy)), overwrite=True)
    shutil.rmtree(copy / ".tmp")
    shutil.copytree(loop.RunFolder(copy).checkpoint, copy / "checkpoint-best")
    train.train(dataclasses.replace(cfg, output_dir=str(copy)), resume=True)
    assert (copy / "checkpoint-best" / "model.safetensors").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "checkpoint").symlink_to(loop.RunFolder(trained).checkpoint)  # another run's weights, by path
    shutil.copy(trained / "config.yaml", elsewhere / "config.yaml")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint in .*elsewhere, as its checkpoint link leads "
                                                 r"to .*checkpoint-\d+, outside the run folder"):
        phase1.load_aligner(elsewhere)


def test_a_config_that_cannot_train_is_refused_before_overwrite_deletes_anything(trained):
    before = sorted(p.name for p in trained.iterdir())
    with pytest.raises(ValueError, match=r"log_every must be an integer of at least 1, got 0"):
        train.parse_args([flag.replace("log_every=1", "log_every=0") for flag in flags_of(trained, "--overwrite")])
    assert sorted(p.name for p in trained.iterdir()) == before


def test_phase2_refuses_a_phase1_run_that_changed_or_never_finished(trained, decoder_dir, tmp_path):
    """A phase-2 run records the sha256 of its phase-1 run's weights; resumed, reused or loaded after those weights
    changed (the phase-1 run retrained or replaced), it is refused, as is a phase-1 run stopped inside an epoch."""
    import yaml
    phase1_run = shutil.copytree(trained, tmp_path / "p1", symlinks=True)
    out = tmp_path / "p2"
    flags = ["--phase1_run", str(phase1_run), "--output_dir", str(out), "--model_name", decoder_dir, "--epochs", "1",
             "--batch_size", "16", "--train_decoder", "full", "--min_steps", "0"]
    L.main(flags)
    run = loop.RunFolder(phase1_run)
    assert yaml.safe_load((out / "config.yaml").read_text())["phase1_weights"] == run.weights_digest()
    aligner = phase1.load_aligner(phase1_run)
    L.MultimodalLLM.load(out, aligner)  # the phase-1 model it was trained on, passed in by hand
    with torch.no_grad():
        next(aligner.model.parameters()).add_(0.01)  # the same model changed in memory: trained further, say
    with pytest.raises(ValueError, match=r"the aligner given to MultimodalLLM.load is not the phase-1 model the "
                                         r"phase-2 run .*p2 was trained on: its tensors are sha256 [0-9a-f]{16}…, the "
                                         r"run recorded [0-9a-f]{16}….*Pass the one it was trained on"):
        L.MultimodalLLM.load(out, aligner)
    weights, state, step = run.load_weights(), run.load_state(), run.checkpoint_step()
    run.save(step, {name: value + 0.01 for name, value in weights.items()}, state)  # retrained: other weights
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    cfg = L.load_llm_config(None, epochs=1, batch_size=16, train_decoder="full", model_name=decoder_dir, min_steps=0)
    for action in (lambda: L.main([*flags, "--resume"]), lambda: L.ensure_phase2(phase1_run, out, cfg),
                   lambda: L.MultimodalLLM.load(out)):
        with pytest.raises(ValueError, match=r"the phase-2 run .*p2 was trained on the phase-1 run .*p1 when its "
                                             r"weights were sha256 [0-9a-f]{16}…, but they are now [0-9a-f]{16}…: .*"
                                             r"Train phase 2 again \(--overwrite"):
            action()
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before
    state["position"] = {**state["position"], "step": 2, "epoch": 0, "batch_in_epoch": 2}  # what Ctrl-C saves
    run.save(2, weights, state)
    with pytest.raises(ValueError, match=r"the phase-1 run .*p1 never finished: its checkpoint is at step 2, 0 of "
                                         r"its 1 epochs done.*Finish it first"):
        L.main([*flags[:3], str(tmp_path / "p2-new"), *flags[4:]])
    assert not (tmp_path / "p2-new").exists()


@pytest.mark.parametrize("edit, words", [
    (lambda text: text.replace("n_registers: 4", "n_registers: 8"),
     r"config.yaml was edited after the run trained; \(trained with, now\): \{'model.n_registers': \(4, 8\)\}"),
    (lambda text: "", r"config.yaml is empty")], ids=["edited", "emptied"])
def test_a_config_yaml_edited_after_training_is_named_and_can_be_restored(trained, tmp_path, edit, words):
    """The checkpoint keeps the config.yaml it was trained under: loading after that file was edited or emptied says
    so (not that the weights are another model's), and restore_config, the command the message gives, puts it back."""
    copy = shutil.copytree(trained, tmp_path / "copy", symlinks=True)
    (copy / "config.yaml").write_text(edit((copy / "config.yaml").read_text()))
    with pytest.raises(ValueError, match=rf"{words}, so it builds another model than the one trained. Put the "
                                         r"trained values back, or restore the file .*restore_config\(\)") as err:
        phase1.load_aligner(copy)
    command = re.search(r'python -c "(.*)"', str(err.value)).group(1)
    exec(command, {})  # what the user pastes
    assert (copy / "config.yaml").read_text() == (trained / "config.yaml").read_text()
    phase1.load_aligner(copy)


@contextlib.contextmanager
def read_only(*folders):
    """Folders nothing can be written in, as a user meets them: without write permission, or, for root (whom
    permissions do not stop), with the immutable flag (chattr +i), taken off again afterwards."""
    root = os.geteuid() == 0
    for folder in folders:
        subprocess.run(["chattr", "+i", str(folder)], check=True) if root else folder.chmod(0o555)
    try:
        yield
    finally:
        for folder in folders:
            subprocess.run(["chattr", "-i", str(folder)], check=True) if root else folder.chmod(0o755)


def test_a_read_only_run_folder_is_named_and_still_loads(trained, tmp_path):
    """--resume of a run in a read-only folder (or beside a read-only lock file's folder) stops before writing, naming
    the folder and the fix; the run is untouched and still loads."""
    run = shutil.copytree(trained, tmp_path / "shared" / "run", symlinks=True)
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    flags = [flag.replace(str(trained), str(run)) for flag in flags_of(trained, "--resume")]
    with read_only(run.parent):  # where the run's lock file goes
        with pytest.raises(PermissionError, match=rf"{run.parent} \(the folder of the run's lock file run.lock\) is "
                                                  r"read-only .*nothing in it was written.*still loads.*cp -a "
                                                  rf"{run} NEW\) and pass --output_dir NEW"):
            train.main(flags)
    with read_only(run):
        with pytest.raises(PermissionError, match=rf"{run} \(the run folder\) is read-only"):
            train.main(flags)
        phase1.load_aligner(run)
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before


def test_a_read_only_feature_cache_is_read_when_warm_and_named_when_cold(trained, cache_dir, tmp_path):
    warm, cold = shutil.copytree(cache_dir, tmp_path / "warm"), tmp_path / "cold"
    cold.mkdir()
    cfg = phase1.load_config(trained / "config.yaml")
    with read_only(warm, cold):
        train.train(dataclasses.replace(cfg, cache_dir=str(warm), output_dir=str(tmp_path / "run")))
        with pytest.raises(PermissionError, match=rf"cache_dir {cold} is read-only .*the features .* are not cached "
                                                  r"there yet.*make it writable, or pass a cache_dir of your own"):
            train.train(dataclasses.replace(cfg, cache_dir=str(cold), output_dir=str(tmp_path / "run2")))
    assert not (tmp_path / "run2").exists()
