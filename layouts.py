"""Real data by folder layout (`LAYOUTS`, the name a config's `dataset:` takes): TVL (Fu et al. 2024) prepared as TVL
prepares it, and your own CSV files; their rows read lazily, each split built for a run by `for_run`."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from config import atomic_write
from images import load_image, open_image, resized


# TVL's image preparation (tvl_enc/tacvis.py, load_vision_data / load_tactile_data), without its training
# augmentations: frozen features are computed once, so every epoch sees the evaluation-time preparation.
TVL_CROP_SCALE = math.sqrt(2) * 0.18  # the vision crop's side, as a fraction of the image's longer side
TVL_DATA3_TOP = 200  # HCT data3 frames are cropped 200 px from the top, as its captions were labelled


def tvl_vision(path, image_size: int, subset: str) -> torch.Tensor:
    """A square crop of side ceil(sqrt(2)*0.18*max(h, w)), centred for SSVTP, at the top centre for HCT
    (200 px down in data3), resized to image_size."""
    import torchvision.transforms.functional as TF
    image = open_image(path)
    width, height = image.size
    side = int(math.ceil(TVL_CROP_SCALE * max(width, height)))
    if subset == "ssvtp":
        image = TF.center_crop(image, side)
    else:
        image = TF.crop(image, TVL_DATA3_TOP if subset == "data3" else 0, (width - side) // 2, side, side)
    return resized(image, image_size)


def _pad_and_rotate(image: Image.Image) -> Image.Image:
    """TVL's tac_padding: zero-pad the shorter side to a square, then rotate 90 degrees counter-clockwise."""
    import torchvision.transforms.functional as TF
    width, height = image.size
    side = max(width, height)
    return TF.rotate(TF.pad(image, [(side - width) // 2, (side - height) // 2]), 90)


def tvl_touch(path, image_size: int, background=None) -> torch.Tensor:
    """The tactile image padded to a square, rotated, resized. With `background` (HCT's tactile_background),
    the background image, prepared the same way, is subtracted at full resolution first, as TVL's
    subtract_background does: the result is signed, in [-1, 1], and the encoder normalises it with TVL's
    background statistics (encoders.TVL_TACTILE_MEAN_STD)."""
    import torchvision.transforms.functional as TF
    image = _pad_and_rotate(open_image(path))
    if background is None:
        return resized(image, image_size)
    difference = TF.to_tensor(image) - TF.to_tensor(_pad_and_rotate(open_image(background)))
    return TF.resize(difference, [image_size, image_size], antialias=True)


SPLIT_SEED = 42  # TVL's random_state for its train/val split; also splits CSV datasets without val/test files
VAL_FRACTION = 0.1


def split_rows(rows: list, part: str, fraction: float = VAL_FRACTION) -> list:
    """TVL's split of a train.csv: sklearn's train_test_split(train_size=1 - fraction, random_state=42),
    `part` 'train' or 'held' (the held-out fraction)."""
    from sklearn.model_selection import train_test_split
    if len(rows) < 2:  # nothing to hold out: a single row trains
        return rows if part == "train" else []
    kept, held = train_test_split(rows, train_size=1 - fraction, random_state=SPLIT_SEED)
    return kept if part == "train" else held


def _caption_codes(captions: list[str]) -> np.ndarray:
    """Each caption's index among the distinct captions: items with the same code have the same caption."""
    codes = {}
    return np.array([codes.setdefault(c, len(codes)) for c in captions])


class FileRows(torch.utils.data.Dataset):
    """Rows of image files and captions: what TVLDataset and CSVDataset share. A row is a dict with
    "caption" and image paths under IMAGE_KEYS; `load(modality, row)` prepares one image."""
    IMAGE_KEYS = ("vision", "touch")

    def __init__(self, rows: list[dict], image_sizes: dict[str, int], where: str):
        if not rows:
            raise FileNotFoundError(f"{where}: no rows with readable images")
        self.rows, self.image_sizes = rows, dict(image_sizes)

    def readable_rows(self, rows: list[dict], where: str) -> list[dict]:
        """The rows whose files all exist; a missing file fails naming it, unless skip_missing drops its row
        (missing or undecodable files then count in one warning). A file outside the dataset's folder (`root`)
        fails unless the dataset was opened with outside=True."""
        if not self.outside:
            for row in rows:
                for path in self._files(row):
                    if not self._inside(path):
                        raise ValueError(f"{where}: the row {row.get('caption') or ''!r} names {path}, which lies "
                                         f"outside the dataset folder {os.path.realpath(self.root)} (an absolute "
                                         "path, '..' or a link out of it); move the file inside, or allow it with "
                                         "paths_outside_dataset: true (--set paths_outside_dataset=true)")
        if not self.skip_missing:
            for row in rows:
                for path in self._files(row):
                    if not os.path.isfile(path):
                        raise FileNotFoundError(f"{where}: file {path} does not exist; fix the path, or pass "
                                                "skip_missing=True (config: skip_missing: true) to drop such rows")
            return rows
        readable = [row for row in rows if self._readable(row)]
        if len(readable) < len(rows):
            warnings.warn(f"{where}: skipped {len(rows) - len(readable)} of {len(rows)} rows whose files are missing "
                          "or unreadable (skip_missing=True)")
        return readable

    def _files(self, row):
        return [row[key] for key in self.IMAGE_KEYS if row.get(key)]

    def _inside(self, path) -> bool:
        root = os.path.realpath(self.root)
        return os.path.commonpath([root, os.path.realpath(path)]) == root

    @staticmethod
    def _decodable(path) -> bool:
        try:
            Image.open(path).close()  # reads the header only: cheap enough for every row
        except OSError:  # missing, or not an image
            return False
        return True

    def _readable(self, row) -> bool:
        return (all(os.path.isfile(path) for path in self._files(row))
                and all(self._decodable(row[key]) for key in self.IMAGE_KEYS if row.get(key)))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        item = {m: self.load(m, row) for m in self.image_sizes}
        return dict(item, caption=row["caption"], factors={}, index=int(i))

    @property
    def captions(self):
        return [row["caption"] for row in self.rows]

    def factor_table(self):
        """What real data knows about its items: which ones share a caption (caption-level retrieval)."""
        return {"caption": _caption_codes(self.captions)}

    @property
    def fingerprint(self):
        """What the cached features of this dataset depend on: the recipe, and every file's size, modification and
        change time, so replacing an image (same path, same row count) gives a new cache — even one given the old
        size and modification time (cp -p, rsync -t, touch -r): the change time is the kernel's, no tool sets it."""
        files = [(path, *_stat(path)) for row in self.rows for path in self._files(row) + [row.get("background")]
                 if path]
        recipe = json.dumps([type(self).__name__, self.root, self.split, self.image_sizes, self.skip_missing,
                             self.rows, files], sort_keys=True, default=str)
        digest = hashlib.sha1(recipe.encode()).hexdigest()[:12]
        return f"{type(self).__name__.lower()}-{self.split}-{digest}"


def _stat(path) -> tuple[int, int, int]:
    try:
        stat = os.stat(path)
    except OSError:  # checked when the rows were read; a file gone since then fails when it is loaded
        return -1, -1, -1
    return stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def tvl_records(table: str, columns: tuple[str, ...]) -> list[dict]:
    """The rows of a TVL CSV (read as read_csv_table reads a CSV dataset's), after checking its header has the
    columns TVL's layout gives it."""
    header, records = read_csv_table(Path(table))
    records = [record for _, record in records]
    missing = [c for c in columns if c not in header]
    if missing:
        raise ValueError(f"{table} has the header {header} but TVL's layout needs the columns "
                         f"{list(columns)} (missing {missing}); fix its first line, e.g. {','.join(columns)}")
    return records


class TVLDataset(FileRows):
    """The Touch-Vision-Language layout: ssvtp/ and hct/data{1,2,3}/, prepared as TVL prepares it.

    split "train" and "val" are TVL's 90/10 split of each subset's train.csv (seed 42), "test" its test.csv.
    image_size: one size, or {modality: size} so each encoder gets images at its own size; only the image
    modalities named there are loaded. subtract_background: subtract HCT's tactile_background image (and, for
    SSVTP, ssvtp/tac_background.png, TVL's tvl_enc/data/tac_background.png), as TVL's subtract_background.
    """
    IMAGE_KEYS = ("vision", "touch", "background")
    LAYOUT = ("{root}/ssvtp/{split}.csv (column url = images_rgb/image_N_rgb.jpg, captions in "
              "ssvtp/text/labels_N.txt) and/or {root}/hct/data{{1,2,3}}/{split}.csv "
              "(header url,tactile,tactile_background,caption); or, for your own data, {root}/train.csv with "
              "columns among vision,touch,caption")

    @classmethod
    def for_run(cls, root, split: str, sizes: dict[str, int], modalities, skip_missing: bool, touch_background: bool,
                outside: bool = False):
        """The split a phase-1 run asks for (LAYOUTS: every layout takes these arguments)."""
        return cls(root, split, sizes, subtract_background=touch_background, skip_missing=skip_missing, outside=outside)

    def __init__(self, root, split="train", image_size=224, subtract_background=False, skip_missing=False,
                 outside=False):
        if split not in ("train", "val", "test"):
            raise ValueError(f"TVL split must be train, val or test; got {split!r}")
        self.root, self.split, self.subtract_background = os.path.abspath(root), split, subtract_background
        self.skip_missing, self.outside = skip_missing, outside
        where = f"TVL {split} under {self.root}"
        table = "test" if split == "test" else "train"
        expected = self.LAYOUT.format(root=self.root, split=table)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"TVL root {self.root} does not exist; expected {expected}")
        # TVL drops SSVTP rows without images, then splits each subset on its own
        rows = self.readable_rows(self._ssvtp_rows(table) + self._hct_rows(table), where)
        self.check_not_swapped(rows, where)
        for row in rows:  # an SSVTP caption is the first line of its labels file
            del row["gel"]
            if "labels" in row:
                with open(row.pop("labels")) as file:
                    row["caption"] = file.readline().strip()
        subsets = [[r for r in rows if r["subset"] == "ssvtp"], [r for r in rows if r["subset"] != "ssvtp"]]
        if split != "test":
            subsets = [split_rows(rows, "train" if split == "train" else "held") for rows in subsets]
        rows = subsets[0] + subsets[1]
        if not rows:
            raise FileNotFoundError(f"no TVL {table}.csv with rows found under {self.root}; expected {expected}")
        sizes = image_size if isinstance(image_size, dict) else {"vision": image_size, "touch": image_size}
        super().__init__(rows, sizes, where)

    def _ssvtp_rows(self, table_name):
        folder = os.path.join(self.root, "ssvtp")
        table = os.path.join(folder, f"{table_name}.csv")
        if not os.path.isfile(table):
            return []
        background = os.path.join(folder, "tac_background.png") if self.subtract_background else None
        if background and not os.path.isfile(background):
            raise FileNotFoundError(f"subtract_background needs SSVTP's tactile background image at {background}; "
                                    "copy TVL's tvl_enc/data/tac_background.png there, or train without it")
        rows = []
        for record in tvl_records(table, ("url",)):
            url = record["url"]
            number = re.search(r"image_(\d+)_rgb", url)
            if number is None:
                raise ValueError(f"{table}: url {url!r} does not look like images_rgb/image_N_rgb.jpg")
            labels = os.path.join(folder, "text", f"labels_{number.group(1)}.txt")
            rows.append(dict(vision=os.path.join(folder, url), touch=os.path.join(folder, url.replace("rgb", "tac")),
                             background=background, labels=labels, subset="ssvtp",
                             gel=os.path.join(folder, "tac_background.png")))
        return rows

    def _hct_rows(self, table_name):
        rows = []
        hct = os.path.join(self.root, "hct")
        for name in sorted(os.listdir(hct)) if os.path.isdir(hct) else []:
            table = os.path.join(hct, name, f"{table_name}.csv")
            if os.path.isfile(table):
                for record in tvl_records(table, ("url", "tactile", "tactile_background", "caption")):
                    folder = os.path.join(hct, name)
                    background = os.path.join(folder, record["tactile_background"])
                    if not os.path.isfile(background):  # TVL's fallback: the sensor's background image
                        background = str(Path(background).parents[2] / "digit_background.png")
                    rows.append(dict(vision=os.path.join(folder, record["url"]),
                                     touch=os.path.join(folder, record["tactile"]),
                                     background=background if self.subtract_background else None,
                                     caption=record["caption"].strip(), subset=name, gel=background))
        return rows

    def check_not_swapped(self, rows: list[dict], where: str, folders: int = 32):
        """Refuse rows whose vision and touch images are swapped (TVL's first public release had such folders: its
        revised release fixes them). The signal: a touch frame is the sensor's bare gel (`gel`: HCT's
        tactile_background, SSVTP's tac_background.png) plus a dent, so it lies far nearer that image than a camera
        frame does (mean pixel difference about 0.03-0.06 against 0.3 on the testbed's layout). One row per
        folder of vision images, for at most `folders` folders, is looked at: three small decodes each. Its limits:
        rows without a bare-gel image (SSVTP without tac_background.png) are not checked, a swap of single files
        inside a folder is seen only when that row is the one looked at, and a camera frame of something that looks
        like the bare gel would read as swapped (it must be twice as near the gel as its touch frame to count)."""
        first = {}  # one row per folder of vision images
        for row in rows:
            if os.path.isfile(row["gel"]) and (self.outside or self._inside(row["gel"])):
                first.setdefault(os.path.dirname(row["vision"]), row)
        sample = list(first.values())[::max(1, len(first) // folders)]
        small = {}

        def distance(path, gel) -> float:
            for file in (path, gel):
                if file not in small:
                    small[file] = resized(open_image(file), 32)
            return float((small[path] - small[gel]).abs().mean())

        swapped = []
        for row in sample:
            try:
                near, far = distance(row["vision"], row["gel"]), distance(row["touch"], row["gel"])
            except ValueError:  # an undecodable file is named when its row is read, not here
                continue
            if 2 * near < far:
                swapped.append((row, near, far))
        if swapped:
            row, near, far = swapped[0]
            raise ValueError(
                f"{where}: the vision and touch images look swapped in {len(swapped)} of the {len(sample)} folders "
                f"checked ({sorted({os.path.dirname(r['vision']) for r, _, _ in swapped})[:5]}): the vision image "
                f"{row['vision']} is nearer the touch sensor's bare-gel image {row['gel']} (mean difference {near:.2f}) "
                f"than its touch image {row['touch']} is ({far:.2f}), where a camera frame differs from the bare gel "
                "far more than a touch frame does. Swap those folders (or the url and tactile columns) back; TVL's "
                "first public release had folders swapped this way, and its revised release fixes them")

    def _files(self, row):  # SSVTP rows also need their labels file
        return super()._files(row) + ([row["labels"]] if "labels" in row else [])

    def load(self, modality, row):
        if modality == "vision":
            return tvl_vision(row["vision"], self.image_sizes["vision"], row["subset"])
        return tvl_touch(row["touch"], self.image_sizes["touch"], row["background"])
CSV_COLUMNS = {"vision": "vision", "touch": "touch", "caption": "text"}  # CSV column -> modality


def read_csv_table(table: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """(header, [(line, row)]) of a CSV dataset's table, as a spreadsheet writes it: UTF-8 with or without a
    byte-order mark, names stripped of spaces; `line` is where the row starts in the file (a quoted caption may span
    lines). A repeated column name, a row with too few fields or another encoding is refused naming the file and
    the line."""
    try:
        with open(table, newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file)
            header = [name.strip() for name in next(reader, [])]
            lines, last = [], reader.line_num
            for fields in reader:
                lines.append((last + 1, fields))
                last = reader.line_num
    except UnicodeDecodeError as err:
        raise ValueError(f"{table} is not UTF-8 text ({err}); save it as CSV UTF-8") from None
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise ValueError(f"{table} names the columns {repeated} more than once; keep one of each")
    for number, fields in lines:
        if fields and len(fields) < len(header):
            raise ValueError(f"{table}, line {number}: {len(fields)} fields where the header has {len(header)} "
                             f"({header}); fill the missing ones")
    return header, [(number, dict(zip(header, fields))) for number, fields in lines if fields]


def csv_columns(folder) -> list[str]:
    """The columns of <folder>/train.csv that name data (vision, touch, caption), in that order."""
    table = Path(folder) / "train.csv"
    header, _ = read_csv_table(table)
    found = [c for c in CSV_COLUMNS if c in header]
    if len(found) < 2:
        raise ValueError(f"{table} has columns {header}; a dataset needs at least two of {list(CSV_COLUMNS)} "
                         "(image paths relative to the CSV, and captions)")
    return found


def csv_modalities(folder) -> tuple[str, ...]:
    """The modalities of a CSV dataset: one per data column (caption -> text)."""
    return tuple(CSV_COLUMNS[c] for c in csv_columns(folder))


def dataset_layout(folder) -> str:
    """'csv' when the folder holds a train.csv of your own, else 'tvl' (ssvtp/, hct/)."""
    if Path(folder).is_file():
        raise ValueError(f"datasets_dir {folder} is a file; pass the folder that holds the data ({Path(folder).parent} "
                         "for its own train.csv)")
    return "csv" if (Path(folder) / "train.csv").is_file() else "tvl"


class CSVDataset(FileRows):
    """Your own data: <root>/train.csv (and optionally val.csv, test.csv) with columns among vision, touch
    (image paths relative to the CSV) and caption. Without test.csv, 10% of train.csv is the test split;
    without val.csv, 10% of the rest is the validation split (seed 42, as TVL splits). Images get a plain
    resize to image_size (one size, or {modality: size}); only the image modalities named there are loaded."""

    @classmethod
    def for_run(cls, root, split: str, sizes: dict[str, int], modalities, skip_missing: bool, touch_background: bool,
                outside: bool = False):
        """The split a phase-1 run asks for, after checking the CSV has a column for every modality it trains."""
        missing = set(modalities) - set(csv_modalities(root))
        if missing:
            raise ValueError(f"model.modalities {list(modalities)} asks for {sorted(missing)}, but {root}/train.csv "
                             f"has columns {csv_columns(root)}; set model.modalities to {list(csv_modalities(root))} "
                             "or a subset")
        return cls(root, split, sizes, skip_missing=skip_missing, outside=outside)

    def __init__(self, root, split="train", image_size=224, skip_missing=False, outside=False):
        if split not in ("train", "val", "test"):
            raise ValueError(f"CSV split must be train, val or test; got {split!r}")
        self.root, self.split, self.skip_missing, self.outside = os.path.abspath(root), split, skip_missing, outside
        if not (Path(self.root) / "train.csv").is_file():
            raise FileNotFoundError(f"no {self.root}/train.csv; a CSV dataset is a folder with train.csv (and "
                                    "optionally val.csv, test.csv) with columns among vision, touch, caption")
        self.columns = csv_columns(self.root)
        where = f"{self.root}/{split}.csv"
        rows = self.readable_rows(self._table(split), where)
        if split != "train":
            self.check_carved(rows, where)
            self.check_unseen(rows, where)
        if "caption" in self.columns and rows and not any(row["caption"] for row in rows):
            raise ValueError(f"{where}: every caption is empty, so there is no text to align or to caption; fill "
                             "the caption column, or drop it to train on the images alone")
        sizes = image_size if isinstance(image_size, dict) else dict.fromkeys(("vision", "touch"), image_size)
        super().__init__(rows, {m: size for m, size in sizes.items() if m in self.columns}, where)

    def check_carved(self, rows: list[dict], where: str):
        """A val or test split carved out of a train.csv of a few rows can come out empty: say how many rows each
        split got, and how many train.csv needs."""
        carved = [held for held in ("test", "val") if not (Path(self.root) / f"{held}.csv").is_file()]
        if rows or self.split not in carved:
            return
        counts = {split: len(self._table(split)) for split in ("train", "val", "test")}
        total = len(self._read(Path(self.root) / "train.csv"))
        # a carved split takes 10% of what is left, rounded up, and nothing of a single row: each carved split
        # needs one row more
        raise ValueError(f"{where}: there is no {self.split}.csv, so its rows are carved from train.csv, which "
                         f"has {total} row{'s' * (total != 1)}: they split into train {counts['train']}, val "
                         f"{counts['val']} and test {counts['test']} rows; give train.csv at least {1 + len(carved)} "
                         f"rows (hundreds, for numbers that mean something), or write a {self.split}.csv of its own")

    def check_unseen(self, rows: list[dict], where: str):
        """Refuse a val or test split that shows images the training split shows too (test.csv a copy of train.csv,
        or train.csv repeating rows, which the carved splits then share): its numbers would measure memory."""
        seen = {path for row in self._table("train") for path in self._files(row)}
        shared = [path for row in rows for path in self._files(row) if path in seen]
        if shared:
            given = (Path(self.root) / f"{self.split}.csv").is_file()
            fix = (f"remove those rows from {self.split}.csv (or from train.csv)" if given else
                   f"train.csv names those images in several rows, and the {self.split} rows are carved from it at "
                   f"random: give each image one row, or write a {self.split}.csv of images of its own")
            raise ValueError(f"{where}: {len(shared)} of its images are training images too (e.g. {shared[0]}), so it "
                             f"would measure memory, not generalisation; {fix}")

    def _table(self, split) -> list[dict]:
        """The rows of <split>.csv; a missing test.csv or val.csv is carved out of train.csv, test first."""
        root = Path(self.root)
        if split != "train" and (root / f"{split}.csv").is_file():
            return self._read(root / f"{split}.csv")
        rows = self._read(root / "train.csv")
        for held in ("test", "val"):
            if (root / f"{held}.csv").is_file():
                continue
            if split == held:
                return split_rows(rows, "held")
            rows = split_rows(rows, "train")
        return rows

    def _read(self, table: Path) -> list[dict]:
        header, records = read_csv_table(table)
        missing = [c for c in self.columns if c not in header]
        if missing:
            raise ValueError(f"{table} lacks the columns {missing} that train.csv has; give every split the same columns")
        if not self.skip_missing:  # (skip_missing drops such rows with the missing files, in one warning)
            for line, record in records:
                self.check_image_cells(table, line, record)
        return [{c: (record[c].strip() if c == "caption" else str(table.parent / record[c])) for c in self.columns}
                | ({} if "caption" in self.columns else {"caption": ""}) for _, record in records]

    def check_image_cells(self, table: Path, line: int, record: dict):
        """Refuse an image cell that names no file: an empty one (joined to the CSV's folder, it would read as
        that folder), or the path of a folder. Checked for every row of the table, whichever split it is carved
        into, so the error names its line."""
        fix = ("fill in the image's path relative to the CSV (e.g. images/0001.png), delete the line, or pass "
               "skip_missing=True (config: skip_missing: true) to drop such rows")
        for column in self.columns:
            if column == "caption":
                continue
            if not any(value.strip() for value in record.values()):
                raise ValueError(f"{table}, line {line} holds commas and no values (a spreadsheet writes such rows "
                                 f"for cells it cleared); {fix}")
            if not record[column].strip():
                raise ValueError(f"{table}, line {line}: the {column} cell is empty; {fix}")
            if (table.parent / record[column]).is_dir():
                raise ValueError(f"{table}, line {line}: {column} {record[column]!r} is the folder "
                                 f"{table.parent / record[column]}, not an image file; {fix}")

    def load(self, modality, row):
        return load_image(row[modality], self.image_sizes[modality])


# Dataset layouts in a folder by the name TrainConfig.dataset gives them ("synthtouch" is generated, not read).
# Each class builds a run's split with `for_run`; a new layout is a class here, its entry, and its test in
# dataset_layout (what --datasets_dir detects).
LAYOUTS = {"tvl": TVLDataset, "csv": CSVDataset}


def write_csv(path, rows: list[list]) -> Path:
    """A CSV file written atomically: a crash never leaves a table that ends mid-row."""
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    return atomic_write(path, lambda tmp: tmp.write_text(text.getvalue(), newline=""))
