# %% [markdown]
# # 01 · The SynthTouch testbed and the frozen encoders
#
# FlexAlign studies how ordered register tokens align touch, vision and language. Before any training we need
# data whose ground truth we know. **SynthTouch** draws every sample from latent factors: *shared* ones
# (texture, orientation, roughness and the pattern's phase) reach both the camera and the touch sensor,
# *vision-only* ones (colour, lighting) reach only the camera, *touch-only* ones (hardness, pressure) only
# the gel sensor. The caption names all of them, so a correct caption needs both modalities.
#
# This notebook tours the testbed, builds the frozen encoders through the real open_clip / timm /
# sentence-transformers factories, caches their features on disk, and looks at what those features see.

# %%
import time

import pandas as pd
import torch
from IPython.display import display

import audit
import evaluate
import phase1
import plots_prefix
import plots_testbed
import workbook
from data import SynthTouch

smoke, run_dir = workbook.start()
cfg = phase1.load_config(None, **workbook.smoke_sizes(workbook.SMOKE_DATA))
print(f"smoke mode: {smoke}; run folder: {run_dir}; {cfg.n_train} train / {cfg.n_val} val / {cfg.n_test} test samples")

# %% [markdown]
# ## Samples
# Each column is one sample: the camera image, the touch-sensor image of the same surface, and the caption.
# Caption words are coloured by factor group (the colours stay the same in every notebook).

# %%
train_set = SynthTouch(cfg.n_train, seed=cfg.data_seed, image_size=cfg.image_size, split="train")
fig = plots_testbed.sample_grid([train_set[i] for i in range(8)])
workbook.save_figure(fig, "01_samples")
fig

# %% [markdown]
# ## Who sees what
# The factor table: the values of each factor, its group (which modality carries it) and its scale.
# *Coarse* factors are about the whole surface: the discrete ones the captions name, and the continuous phases,
# instance detail that makes exact-pair retrieval meaningful (one right answer instead of a whole factor class).
# *Fine* factors are about its parts, one value per tile of a grid: wear (the central tiles' print bleaches,
# their grooves flatten and the surface sinks: seen and felt), stains (each quarter's ink turns brown and darker:
# seen only) and compliance (the central tiles sink deeper into the gel: felt only). They appear in no caption;
# they are what later tokens are for.

# %%
factor_table = pd.DataFrame([{"factor": name, "group": group, "scale": SynthTouch.SCALE[name],
                              "values": SynthTouch.describe(name)}
                             for name, group in SynthTouch.factor_groups.items()]).set_index("factor")
factor_table

# %%
fig = plots_testbed.factor_visibility(SynthTouch.factor_groups)
workbook.save_figure(fig, "01_who_sees_what")
fig

# %% [markdown]
# ## The physics is honest
# `render` draws a sample from chosen factors. Changing a vision-only factor must leave the touch image
# untouched, changing a touch-only factor must leave the vision image untouched, and a shared factor changes
# both. Under each image: the share of pixels that moved against the base column (same seed, same noise). The
# last three columns set every other tile of a fine factor.

# %%
base = {"texture": "stripes", "orientation": "diagonal", "roughness": "medium", "color": "red",
        "lighting": "bright", "hardness": "medium", "pressure": "firm"}
checker = {name: tuple(0.9 * ((i // side + i % side) % 2) for i in range(side * side))  # every other tile
           for name, side in SynthTouch.DETAILS.items()}
base.update({name: (0.0,) * side ** 2 for name, side in SynthTouch.DETAILS.items()})  # no wear, stains, give
changes = [("color", "blue"), ("lighting", "dim"), ("hardness", "soft"), ("pressure", "light"),
           ("texture", "dots"), ("orientation", "vertical"), *checker.items()]
fig = plots_testbed.render_variations(train_set, base, changes)
workbook.save_figure(fig, "01_render_variations")
fig

# %% [markdown]
# ## Frozen encoders
# Each modality gets a frozen encoder built by the same factory that builds the real ones: a small OpenCLIP
# ViT for the camera, a small timm ViT for the touch sensor (both random, `pretrained=None`: nothing is
# downloaded), and the real pretrained all-MiniLM-L6-v2 for captions. Swapping in OpenCLIP ViT-L-14 or the TVL
# tactile encoder is a config change (`configs/flextok.yaml`). Every encoder returns pooled features,
# token features and a token mask.

# %%
encoders = {m: phase1.get_encoder(cfg, m) for m in ("vision", "touch", "text")}
examples = [train_set[i] for i in range(4)]
rows = []
for modality, encoder in encoders.items():
    inputs = [s["caption"] for s in examples] if modality == "text" else torch.stack([s[modality] for s in examples])
    out = encoder(inputs)
    rows.append({"modality": modality, "family": encoder.cfg.family, "architecture": encoder.cfg.model_name,
                 "pooled": tuple(out.pooled.shape), "tokens": tuple(out.tokens.shape),
                 "trainable parameters": sum(p.numel() for p in encoder.parameters() if p.requires_grad)})
pd.DataFrame(rows).set_index("modality")

# %% [markdown]
# ## The feature cache
# Training never runs the encoders: their features are computed once per (encoder, dataset split) and stored
# as memory-mapped arrays with checksums under `cache/features/`. The second call below reads the cache
# instead of encoding (a damaged cache is detected and rebuilt).

# %%
timings = {}
for attempt in ("first call", "second call"):
    start = time.perf_counter()
    train_data, train_features = phase1.split_data(cfg, "train")
    timings[attempt] = time.perf_counter() - start
for modality, features in train_features.items():
    print(f"{modality}: pooled {features.pooled.shape}, tokens {features.tokens.shape} ({features.tokens.dtype}), "
          f"memory-mapped: {type(features.tokens).__name__}")
workbook.record("01 data and encoders", **{f"train features, {k} (s)": round(v, 2) for k, v in timings.items()})
timings

# %% [markdown]
# ## What the frozen features see
# A 2-D PCA of each encoder's pooled features, coloured by a shared factor and by that modality's private
# factor. The encoders are random, so do not expect clean clusters: the point of phase 1 is to learn registers
# that pull the shared information out of these features. Colour (with lighting) dominates the camera's
# leading components; the touch features' leading components show little structure, since what they keep is
# spread over many directions (notebook 03 reads it out with linear probes).

# %%
factors = train_data.factor_table()
value_names = dict(SynthTouch.FACTORS)
for modality, private in (("vision", "color"), ("touch", "hardness")):
    points = evaluate.project_2d({modality: torch.tensor(train_features[modality].pooled)})  # a copy: the cache is read-only
    fig = plots_prefix.embedding_views(points, factors, ["roughness", private], value_names,
                                       title=f"Frozen {modality} features (PCA of pooled features)")
    workbook.save_figure(fig, f"01_frozen_{modality}_features")
    display(fig)

# %% [markdown]
# ## What the frozen features hold, factor by factor
# A register module can only keep what its frozen encoder passes on, and reconstructing the frozen features only
# rewards a factor as much as it moves them. So before training anything: each factor redrawn alone, everything
# else and the sensor noise fixed — the share of the frozen tokens' variance that moves with it (left) — and how
# well one linear probe (`probes.py`, the one every notebook uses) reads it from the pixels and from the frozen
# tokens (right). The fine factors a sensor sees should move at least a fifth of its tokens' variance between
# them (dashed, left) and each be read at R² ≥ 0.5 from the frozen tokens (dashed, right), and the phases should
# no longer dominate. `audit.verdict` checks the three.

# %%
testbed = audit.audit(cfg, n=8 if smoke else 48)
workbook.record("01 testbed audit", **{f"{m}: {check}": value for m, row in audit.verdict(testbed).iterrows()
                                       for check, value in row.items()})
fig = plots_testbed.testbed_audit(testbed, audit.FINE_SHARE, audit.READABLE)
workbook.save_figure(fig, "01_testbed_audit")
fig

# %%
audit.verdict(testbed)
