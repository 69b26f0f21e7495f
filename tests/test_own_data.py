"""Your own data end to end, as a new user meets it: a CSV of ordinary-English captions sharing no word with
SynthTouch's, the README's "Use your own data" commands run verbatim (no YAML, no extra flags), and phase 2 that
writes those captions from the tokens of images it has never seen."""
import json
import re
import shlex
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import data
import llm_integration as L
import phase1
import train

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
# what is in each picture and where: 24 captions, each a combination the images show by the object's shape and
# colour and the background's colour
OBJECTS = {"kettle": ("ellipse", (230, 60, 60)), "bicycle": ("rectangle", (240, 220, 60)),
           "lantern": ("triangle", (60, 220, 230)), "teapot": ("cross", (230, 120, 230)),
           "violin": ("ring", (250, 250, 250)), "umbrella": ("bar", (20, 20, 20))}
PLACES = {"kitchen": (40, 60, 160), "garden": (40, 140, 60), "attic": (150, 90, 40), "harbour": (120, 120, 120)}


def picture(shape: str, ink: tuple, background: tuple, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """A shape of colour `ink` on a background, moved, scaled and tinted a little at random, with pixel noise."""
    tint = tuple(int(c + rng.integers(-20, 21)) for c in background)
    image = Image.new("RGB", (size, size), tint)
    draw = ImageDraw.Draw(image)
    r, x, y = int(rng.integers(12, 18)), *(int(v) for v in rng.integers(24, 41, 2))
    box = (x - r, y - r, x + r, y + r)
    if shape == "ellipse":
        draw.ellipse(box, fill=ink)
    elif shape == "rectangle":
        draw.rectangle(box, fill=ink)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=ink)
    elif shape == "cross":
        draw.rectangle((x - r, y - 4, x + r, y + 4), fill=ink)
        draw.rectangle((x - 4, y - r, x + 4, y + r), fill=ink)
    elif shape == "ring":
        draw.ellipse(box, outline=ink, width=5)
    else:
        draw.rectangle((4, y - 5, size - 4, y + 5), fill=ink)
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_dataset(folder: Path, per_caption: int = 10) -> list[str]:
    rng = np.random.default_rng(0)
    rows = [{"vision": picture(*OBJECTS[name], colour, rng), "caption": f"an old {name} waiting in the {place}"}
            for _ in range(per_caption) for name in OBJECTS for place, colour in PLACES.items()]
    data.write_csv_dataset(folder, {"train": rows})
    return sorted({row["caption"] for row in rows})


def test_the_readme_commands_caption_ordinary_english_from_the_shared_tokens(tmp_path, monkeypatch):
    captions = write_dataset(tmp_path / "mine")
    words = {w for c in captions for w in c.split()}
    synthtouch = {w for c in data.SynthTouch(2000).captions for w in re.findall(r"[a-z]+", c)}
    assert len(captions) == 24 and not words & synthtouch
    section = README.split("## Use your own data", 1)[1].split("\n## ", 1)[0]
    commands = re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip().splitlines()
    scripts = {"train.py": train.main, "llm_integration.py": L.main}
    monkeypatch.chdir(tmp_path)
    for line in commands:
        python, script, *argv = shlex.split(line)
        assert python == ".venv/bin/python"
        scripts[script](argv)  # verbatim: the README's flags and nothing else
    run = tmp_path / "runs" / "mine" / "phase2"
    result = json.loads((run / "caption_eval.json").read_text())
    n_shared = phase1.run_config(tmp_path / "runs" / "mine" / "phase1").model.n_shared
    (row,) = [r for r in result["rows"] if r["modalities"] == "vision" and r["k"] == n_shared]
    print({(r["modalities"], r["k"]): round(r["caption accuracy"], 3) for r in result["rows"]})  # in the test's log
    assert row["caption accuracy"] >= 0.9, row["examples"]
    # the decoder read the captions a token per word: its tokenizer was fitted on them
    tokenizer = L.MultimodalLLM.load(run).tokenizer
    assert all(len(tokenizer(c, add_special_tokens=False).input_ids) == len(c.split()) for c in captions)
