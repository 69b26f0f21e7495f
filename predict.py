"""Use a trained model on new images: embed them (a phase-1 run) or caption them (a phase-2 run) from the first k
tokens, and write one CSV row per image.

    python predict.py RUN IMAGES --k 4 --out out.csv

IMAGES: a folder (every image file in it, sorted by name) or a CSV with a `vision` or `touch` column of image paths
relative to the CSV (your own data's layout). A phase-2 RUN writes `image,caption`; a phase-1 RUN writes
`image,e0,e1,...`, the L2-normalised shared embedding of the first k registers.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

import layouts
import loop
import phase1
from captioner import MultimodalLLM
from config import HelpFormatter
from token_sources import IMAGE_MODALITIES

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def image_paths(images: str | Path, modality: str) -> list[Path]:
    """The image files a folder holds, or those a CSV's `modality` column names (relative to the CSV)."""
    images = Path(images)
    if images.is_dir():
        found = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise FileNotFoundError(f"{images} holds no image files ({', '.join(IMAGE_SUFFIXES)}); pass a folder of "
                                    "images or a CSV with a vision column")
        return found
    if images.suffix.lower() == ".csv" and images.is_file():
        with open(images, newline="") as file:
            rows = list(csv.DictReader(file))
        if not rows or modality not in rows[0]:
            raise ValueError(f"{images} has no {modality} column (columns: {list(rows[0]) if rows else []}); give its "
                             f"image paths a {modality} column, relative to the CSV, or pass --modality")
        return [images.parent / row[modality] for row in rows]
    raise FileNotFoundError(f"{images} is neither a folder of images nor a CSV file; pass one of them")


@torch.no_grad()
def predict(run: str | Path, images: str | Path, k: int | None = None, modality: str = "vision",
            batch_size: int = 64) -> tuple[list[str], list[list]]:
    """(header, rows): a caption per image for a phase-2 run, an embedding per image for a phase-1 run."""
    paths = image_paths(images, modality)
    saved = loop.RunFolder(run).saved_config() if (Path(run) / "config.yaml").is_file() else {}
    chunks = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    if "llm" in saved:
        mm = MultimodalLLM.load(run)
        captions = [c for chunk in chunks for c in mm.generate(**{"images" if modality == "vision" else "touch": chunk},
                                                               k=k)]
        return ["image", "caption"], [[str(p), c] for p, c in zip(paths, captions)]
    aligner = phase1.load_aligner(run)
    embeddings = torch.cat([aligner.embed(modality, chunk, k) for chunk in chunks]).cpu()
    header = ["image"] + [f"e{i}" for i in range(embeddings.shape[1])]
    return header, [[str(p), *map(float, e)] for p, e in zip(paths, embeddings)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("run", help="a phase-1 run (train.py --output_dir: embeddings) or a phase-2 run "
                                    "(llm_integration.py --output_dir: captions)")
    parser.add_argument("images", help="a folder of images, or a CSV with a column of image paths")
    parser.add_argument("--k", type=int, help="use the first k tokens (None: the run's own, all for phase 1)")
    parser.add_argument("--modality", choices=IMAGE_MODALITIES, default="vision", help="what the images are")
    parser.add_argument("--out", type=Path, required=True, default=argparse.SUPPRESS, help="the CSV to write")
    args = parser.parse_args(argv)
    header, rows = predict(args.run, args.images, args.k, args.modality)
    layouts.write_csv(args.out, [header, *rows])
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
