"""Stand-ins written in the real layouts, so every layout runs without its data: SynthTouch samples in TVL's folders
(`write_tvl_layout`), scikit-learn's digits as your own CSV (`write_digits_csv`)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from layouts import CSV_COLUMNS, TVL_CROP_SCALE, TVL_DATA3_TOP, write_csv
from synthtouch import SynthTouch, SynthTouchRenderer


def write_csv_dataset(folder, splits: dict[str, list[dict]]) -> Path:
    """Write your-own-data layout: per split, rows of {"vision": image, "touch": image, "caption": str}
    (images as PIL images or 3xHxW tensors in [0, 1]) -> <folder>/images/<split>_<i>_<column>.png + <split>.csv."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        columns = [c for c in CSV_COLUMNS if c in rows[0]]
        records = [columns]
        for i, row in enumerate(tqdm(rows, desc=f"writing {split}.csv images", leave=False)):
            record = []
            for column in columns:
                if column == "caption":
                    record.append(row[column])
                    continue
                name = f"images/{split}_{i}_{column}.png"
                _pil(row[column]).save(folder / name)
                record.append(name)
            records.append(record)
        write_csv(folder / f"{split}.csv", records)
    return folder


def _pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return Image.fromarray((image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def write_tvl_layout(folder, splits: dict[str, "SynthTouch"], image_size: int = 64) -> Path:
    """SynthTouch samples in the exact TVL layout, to try the TVL route without the data: even samples go to
    ssvtp/ (train.csv/test.csv with column url, text/labels_N.txt), odd ones to hct/data{1,2,3}/ (header
    url,tactile,tactile_background,caption, contact.json, a bare-gel background image). Vision images sit
    where TVL's crop finds them and touch images are turned so its rotation turns them back, so the prepared
    images are the rendered ones (up to JPEG and resizing)."""
    folder, number = Path(folder), 0
    tables = {}  # csv path -> rows
    gel = Image.new("RGB", (image_size, image_size), tuple(int(255 * c) for c in SynthTouchRenderer.GEL))
    for split, dataset in splits.items():
        for i in tqdm(range(len(dataset)), desc=f"writing TVL {split}", leave=False):
            sample = dataset[i]
            vision, touch = _pil(sample["vision"]), _pil(sample["touch"]).resize((image_size, image_size)).rotate(-90)
            subset = "ssvtp" if i % 2 == 0 else f"data{1 + i // 2 % 3}"
            width = max(4 * image_size, 272 if subset == "data3" else 0)  # data3 is cropped 200 px down
            side = int(math.ceil(TVL_CROP_SCALE * width))
            top = int(round((width - side) / 2)) if subset == "ssvtp" else TVL_DATA3_TOP * (subset == "data3")
            canvas = Image.new("RGB", (width, width), (128, 128, 128))
            canvas.paste(vision.resize((side, side), Image.Resampling.BILINEAR), ((width - side) // 2, top))
            if subset == "ssvtp":
                root, number = folder / "ssvtp", number + 1
                url = f"images_rgb/image_{number}_rgb.jpg"
                files = {url: canvas, url.replace("rgb", "tac"): touch}
                (root / "text").mkdir(parents=True, exist_ok=True)
                (root / "text" / f"labels_{number}.txt").write_text(sample["caption"] + "\n")
                tables.setdefault(root / f"{split}.csv", [["url"]]).append([url])
            else:
                root = folder / "hct" / subset
                row = [f"{split}/vision/{i}.jpg", f"{split}/tactile/{i}.jpg", "background/background.jpg"]
                files = {row[0]: canvas, row[1]: touch, row[2]: gel}
                tables.setdefault(root / f"{split}.csv", [["url", "tactile", "tactile_background", "caption"]]
                                  ).append(row + [sample["caption"]])
                contact = json.loads((root / "contact.json").read_text()) if (root / "contact.json").is_file() else {}
                for key, path in zip(("vision", "tactile", "background"), row):
                    contact.setdefault(key, []).append(path)
                root.mkdir(parents=True, exist_ok=True)
                (root / "contact.json").write_text(json.dumps(contact))
            for name, image in files.items():
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                image.save(root / name, quality=90)
    for path, rows in tables.items():
        write_csv(path, rows)
    if (folder / "ssvtp").is_dir():  # the bare gel, for subtract_background (TVL ships its own)
        gel.save(folder / "ssvtp" / "tac_background.png")
    return folder


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def write_digits_csv(folder, image_size: int = 32, n: int | None = None) -> Path:
    """A CSV dataset nobody here designed: scikit-learn's bundled handwritten digits (8x8, 1797 of them),
    upsampled to image_size RGB PNGs, captioned "a handwritten digit seven". train.csv and test.csv (the last
    20%, as sklearn orders them); val.csv is left to the 10% split. n: only the first n digits."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    images, labels = digits.images[:n], digits.target[:n]
    rows = [{"vision": Image.fromarray((image * 255 / 16).astype(np.uint8)).convert("RGB").resize(
                 (image_size, image_size), Image.Resampling.NEAREST),
             "caption": f"a handwritten digit {DIGIT_NAMES[label]}"} for image, label in zip(images, labels)]
    cut = int(len(rows) * 0.8)
    return write_csv_dataset(folder, {"train": rows[:cut], "test": rows[cut:]})
