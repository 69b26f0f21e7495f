# %% [markdown]
# # 05 · Real data: TVL folders, stage-1 checkpoints, your own CSV
#
# The same code that trains on SynthTouch trains on real data; only the inputs change. Three things can be
# pointed at:
#
# - **TVL data** (`ssvtp/`, `hct/data{1,2,3}/`): images are prepared as TVL prepares them (the vision crop, the
#   tactile padding and rotation, optionally HCT's background subtraction), `train.csv` is split 90/10 into
#   train / validation with TVL's seed, `test.csv` is the test split.
# - **A TVL stage-1 checkpoint**: its tactile encoder becomes the frozen touch encoder, with the architecture,
#   image size and normalisation read from the checkpoint itself (loaded with `weights_only=True`).
# - **Your own CSV files**: a folder with `train.csv` (optionally `val.csv`, `test.csv`) whose columns are
#   any of `vision`, `touch`, `caption`; the modalities follow the columns.
#
# Set the three paths below to your files. Left at `None`, the notebook writes stand-ins: SynthTouch samples
# in the exact TVL layout, a checkpoint in TVL's key layout, and scikit-learn's handwritten digits as a CSV.
# Everything runs through `train.parse_args`, i.e. exactly the seed command lines.

# %%
import pandas as pd
import timm
import torch

import data
import demo
import evaluate
import llm_integration
import plots_prefix
import retrieval
import train
import workbook
from encoders import resolve_encoder, write_tvl_checkpoint

TVL_DIR = None  # e.g. "DATA/tvl": the folder holding ssvtp/ and hct/
STAGE1_CHECKPOINT = None  # e.g. "stage1_best.pth" from TVL's tvl_enc
CSV_DIR = None  # e.g. "DATA/mine": train.csv with columns among vision, touch, caption

smoke, run_dir = workbook.start()
# the TVL stand-in: five phase-1 epochs, and ten phase-2 epochs (its adjective F1 is lower after fewer steps)
n_pairs, epochs, llm_epochs = (48, 2, 1) if smoke else (600, 5, 10)

# %% [markdown]
# ## Stand-ins, when no paths are given
# The TVL stand-in is SynthTouch written file by file in TVL's layout (the vision image placed where TVL's
# crop finds it, the tactile image turned so TVL's rotation turns it back); the checkpoint holds a random
# ViT-tiny in TVL's keys (`model` with `logit_scale` and `tactile_encoder.*`, `args` an `argparse.Namespace`), so
# the route runs end to end, though its touch features mean nothing. It takes 112 px images where TVL's takes 224:
# the route reads the image size from the checkpoint, and 49 patch tokens train twice as fast as 196.

# %%
examples = run_dir / "real_data"
if TVL_DIR is None:
    TVL_DIR = examples / "tvl"
    if not (TVL_DIR / "ssvtp" / "train.csv").is_file():
        data.write_tvl_layout(TVL_DIR, {"train": data.SynthTouch(n_pairs, image_size=64),
                                        "test": data.SynthTouch(n_pairs // 4, image_size=64, split="test")})
if STAGE1_CHECKPOINT is None:
    STAGE1_CHECKPOINT = examples / "stage1_best.pth"
    torch.manual_seed(0)
    depth = 2 if smoke else 12  # TVL's ViT-tiny has 12 blocks; the smoke run keeps 2 of them
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=768, global_pool="avg", depth=depth,
                            img_size=112)
    write_tvl_checkpoint(vit, STAGE1_CHECKPOINT, tactile_model="vit_tiny_patch16_224", subtract_background=None)
csv_epochs, csv_llm = epochs, {}  # your own CSV trains as long as the TVL route
if CSV_DIR is None:
    CSV_DIR = examples / "digits"
    if not (CSV_DIR / "train.csv").is_file():
        data.write_digits_csv(CSV_DIR, n=n_pairs * 2 if smoke else None)
    if not smoke:  # ten captions are learnt sooner: three phase-1 epochs and 400 phase-2 steps caption as well as more
        csv_epochs, csv_llm = 3, {"epochs": 5, "min_steps": 0}
resolve_encoder("tvl-touch-vit-tiny", weights=str(STAGE1_CHECKPOINT))

# %% [markdown]
# ## Phase 1 on TVL data with the stage-1 touch encoder
# The seed command line, as written: `python train.py --stage1_checkpoint CKPT --datasets_dir DIR --output_dir
# OUT --epochs N --batch_size B --n_registers 32 --n_shared 8`. Captions repeat in real data (TVL's are
# adjective lists), so retrieval also counts a hit when the retrieved item has the query's caption, beside its
# chance level, which follows the caption frequencies. The table shows R@1 at every k and, last, TVL's own number
# (`touch<->vision TVL top-1`): the touch→vision and vision→touch top-1 accuracy of exact pairs, averaged, with the
# whole test set scored as one batch as TVL's code does, so it can be set beside the numbers TVL reports (as a
# fraction where TVL prints percent).

# %%
tvl_cfg, _ = train.parse_args(["--stage1_checkpoint", str(STAGE1_CHECKPOINT), "--datasets_dir", str(TVL_DIR),
                               "--output_dir", str(run_dir / "phase1" / "tvl"), "--epochs", str(epochs),
                               "--batch_size", "16", "--n_registers", "32", "--n_shared", "8"])
tvl_run = train.ensure_trained(tvl_cfg, threads=demo.threads)  # make demo's share of the cores
tvl_table = evaluate.read_eval(tvl_run / "eval.json")
evaluate.retrieval_columns(tvl_table)

# %% [markdown]
# ## Phase 1 on your own CSV: vision + text
# The digits CSV has a `vision` and a `caption` column, so the model aligns vision with text; no touch is
# needed. Ten captions ("a handwritten digit seven") repeat over hundreds of images: exact-pair retrieval can
# hardly rise above its chance level, caption-level retrieval shows what the model learned.

# %%
csv_cfg, _ = train.parse_args(["--datasets_dir", str(CSV_DIR), "--output_dir", str(run_dir / "phase1" / "digits"),
                               "--epochs", str(csv_epochs), "--batch_size", "32"])
print("modalities from the CSV columns:", csv_cfg.model.modalities)
csv_run = train.ensure_trained(csv_cfg, threads=demo.threads)
csv_table = evaluate.read_eval(csv_run / "eval.json")
evaluate.retrieval_columns(csv_table)

# %%
k = csv_cfg.model.n_shared
bars = {"TVL vision→touch": (tvl_table.loc[8, "vision->touch R@1 caption"], tvl_table.loc[8, "chance@1 caption"]),
        "digits vision→text": (csv_table.loc[k, "vision->text R@1 caption"], csv_table.loc[k, "chance@1 caption"])}
fig = plots_prefix.recall_vs_chance(bars)
workbook.save_figure(fig, "05_caption_retrieval")
fig

# %% [markdown]
# ## Phase 2: captions
# Phase 2 trains a decoder on each phase-1 run, as `python llm_integration.py --phase1_run RUN --output_dir OUT`
# does (the decoder captions from the image modalities of the phase-1 run: vision alone for the digits). Its
# metrics are the COCO caption toolkit's BLEU-4 and CIDEr-D, caption accuracy (the exact caption), and, for
# adjective-list captions such as TVL's, precision / recall / F1 per adjective.

# %%
llm = dict(epochs=llm_epochs, batch_size=16, **workbook.smoke_sizes({"min_steps": 0}))
tvl_captions = llm_integration.ensure_phase2(tvl_run, run_dir / "phase2" / "tvl", llm_integration.load_llm_config(None, **llm),
                                             threads=demo.threads)
csv_captions = llm_integration.ensure_phase2(csv_run, run_dir / "phase2" / "digits", llm_integration.load_llm_config(
    None, **{**llm, **csv_llm, "source.modalities": ["vision"]}), threads=demo.threads)
metrics = ["modalities", "k", "caption accuracy", "bleu4", "cider_d"]
display_rows = pd.DataFrame(csv_captions["rows"])[metrics]
display_rows

# %%
pd.DataFrame(csv_captions["rows"][-1]["examples"])

# %%
pd.DataFrame(tvl_captions["rows"][-1]["examples"])

# %%
best = max(csv_captions["rows"], key=lambda r: r["k"])
workbook.record("05 real data",
                **{"TVL vision->touch R@1 caption (k=8)": bars["TVL vision→touch"][0],
                   "TVL chance@1 caption": bars["TVL vision→touch"][1],
                   f"TVL {retrieval.TVL_TOP1} (k=8)": tvl_table.loc[8, retrieval.TVL_TOP1],
                   f"digits vision->text R@1 caption (k={k})": bars["digits vision→text"][0],
                   "digits chance@1 caption": bars["digits vision→text"][1],
                   f"digits caption accuracy (k={best['k']})": best["caption accuracy"]})
