# %% [markdown]
# # 03 · Coarse to fine: how good is every prefix of k tokens, and what does each token know?
#
# Register i never attends to registers after it, so one forward pass gives the representation for every
# prefix length k at once (a test proves it equals k separate passes with only k registers). Nested dropout
# trains every prefix to stand on its own. This notebook measures quality against k for each design line and
# each nested-dropout mode, reads out with linear probes which token carries which factor (the *information
# map*), checks whether shared tokens leak private factors, shows where registers look in the image, and
# ends with a slider over k that shows a query's nearest neighbours of the other modality.

# %%
import pandas as pd
from IPython.display import display

import evaluate
import plots
import train
import workbook
from data import SynthTouch

smoke, run_dir = workbook.start()
# the same sizes and run folders as notebook 02, so runs trained there are reused here
SMOKE = {"n_train": 256, "n_val": 64, "n_test": 128, "epochs": 2, "batch_size": 64} if smoke else {}
cfg = train.load_config(None, output_dir=str(run_dir / "phase1" / "default"), **SMOKE)
print(f"smoke mode: {smoke}; {cfg.n_train} train / {cfg.n_test} test samples, {cfg.epochs} epochs per run")

# %% [markdown]
# ## The runs
# The nested-dropout ablation trains `configs/default.yaml` four times, changing only `nested_dropout`:
# `power_of_two` (k drawn from 1, 2, 4, …), `uniform` (k drawn from 1…R), `linear` (drop probability rising
# from 0 on the first register to 0.5 on the last) and `none` (always all registers). The design lines are the
# three of notebook 02 at testbed width. A finished run of the same config is reused, so re-running costs nothing.

# %%
dropout_runs = {"power_of_two": train.ensure_trained(cfg)}
for mode in ("uniform", "linear", "none"):
    mode_cfg = train.load_config(None, output_dir=str(run_dir / "phase1" / f"dropout-{mode}"),
                                 **{"model.nested_dropout": mode, **SMOKE})
    dropout_runs[mode] = train.ensure_trained(mode_cfg)
design_runs = {design: train.ensure_trained(train.design_on_testbed(
    design, output_dir=str(run_dir / "phase1" / f"testbed-{design}"), **SMOKE))
    for design in ("flextok", "fluxtalk", "adapter")}
print({name: f"{train.training_minutes(run):.1f} min" for name, run in {**dropout_runs, **design_runs}.items()})

# %% [markdown]
# ## Quality vs k, per nested-dropout mode
# Every curve comes from the run's `eval.json` (test split, one forward pass). Retrieval uses the shared
# embedding, the mean of the first min(k, n_shared) tokens, so it can only change up to k = n_shared; the
# preservation cosine (each modality reconstructing its own frozen features) keeps using every kept token.
# Without nested dropout, the model only ever saw all registers in training, so short prefixes are off the
# training distribution.

# %%
dropout_tables = {mode: evaluate.read_eval(run / "eval.json") for mode, run in dropout_runs.items()}
retrieval = ["vision->touch R@1 pair", "vision->touch R@1 factor", "touch->vision R@1 pair"]
chance = {"vision->touch R@1 pair": "chance@1 pair", "vision->touch R@1 factor": "chance@1 factor",
          "touch->vision R@1 pair": "chance@1 pair"}
fig = plots.prefix_curves(dropout_tables, retrieval + ["vision recon cos", "touch recon cos"],
                          "Quality vs prefix length k, per nested-dropout mode (test split)", chance)
workbook.save_figure(fig, "03_quality_vs_k_dropout")
fig

# %% [markdown]
# Is quality non-decreasing in k? For every recall, `prefix_drops` finds the largest drop from a shorter prefix
# to a longer one and compares it with two standard errors of the difference of two recalls on the test set
# (binomial noise, sqrt(p(1−p)/n + p′(1−p′)/n)). The table says, per mode, whether any drop is beyond that noise,
# and how much R@1 the shortest prefix keeps relative to the full shared embedding.

# %%
n_queries = cfg.n_test
k_shared = cfg.model.n_shared
summary = {}
for mode, table in dropout_tables.items():
    drops = evaluate.prefix_drops(table, n_queries)
    summary[mode] = {"R@1 pair at k=1": table.loc[1, "vision->touch R@1 pair"],
                     f"R@1 pair at k={k_shared}": table.loc[k_shared, "vision->touch R@1 pair"],
                     "R@1 factor at k=1": table.loc[1, "vision->touch R@1 factor"],
                     f"R@1 factor at k={k_shared}": table.loc[k_shared, "vision->touch R@1 factor"],
                     "vision recon cos at k=1": table.loc[1, "vision recon cos"],
                     f"vision recon cos at k={table.index[-1]}": table["vision recon cos"].iloc[-1],
                     "largest recall drop": drops["largest drop"].max(),
                     "noise (2 SE) at that drop": drops.loc[drops["largest drop"].idxmax(), "noise (z·SE)"],
                     "any drop beyond noise": bool(drops["any drop beyond noise"].any())}
summary = pd.DataFrame(summary).T
workbook.record("03 nested-dropout ablation (vision->touch, test)",
                **{f"{mode}: {name}": value for mode, row in summary.iterrows() for name, value in row.items()})
summary.round(3)

# %% [markdown]
# ## Quality vs k, per design line
# FlexTok-style registers (joint attention, 32 registers of which 8 shared), FluxTalk-style (cross-attention,
# 4 registers of which 3 overlapping) and the MLP adapter, which has one embedding and so one point at k = 1
# (with a dashed line across, for comparison with every prefix).

# %%
design_tables = {design: evaluate.read_eval(run / "eval.json") for design, run in design_runs.items()}
fig = plots.prefix_curves(design_tables, retrieval, "Quality vs prefix length k, per design line (test split)", chance)
workbook.save_figure(fig, "03_quality_vs_k_designs")
workbook.record("03 design lines: vision->touch R@1 pair at k=1 and at the full shared embedding",
                **{f"{design}: k={k}": table.loc[k, "vision->touch R@1 pair"]
                   for design, table in design_tables.items() for k in sorted({1, table.index[-1]})})
fig

# %% [markdown]
# ## The information map: which token knows which factor
# For the default model we encode the training and test splits once, then fit a linear probe for every factor
# from every single register token and from the shared and private token groups of each modality: logistic
# regression for discrete factors (accuracy), ridge regression for the continuous phases (R² of (cos, sin) of
# the phase). Probes are fit on train and scored on test. Cells show the score above chance,
# (score − chance)/(1 − chance), so 0 is chance and 1 is perfect; factor names are coloured by who sees them.

# %%
model = train.load_aligner(dropout_runs["power_of_two"]).model
train_set, train_features = train.split_data(cfg, "train")
test_set, test_features = train.split_data(cfg, "test")
last = [cfg.model.n_registers]
train_tokens = {m: e.tokens for m, e in evaluate.encode_all(model, train_features, last, progress=True).items()}
test_encoded = evaluate.encode_all(model, test_features, cfg.model.prefix_lengths, progress=True)
info = evaluate.information_map(train_tokens, train_set.factor_table(), {m: e.tokens for m, e in test_encoded.items()},
                                test_set.factor_table(), n_shared=k_shared)
fig = plots.information_map(info, n_shared=k_shared)
workbook.save_figure(fig, "03_information_map")
fig

# %% [markdown]
# The numbers behind the map, from the token groups: shared factors should be decodable from *both*
# modalities' shared tokens, vision-only factors from the vision private tokens, touch-only factors from the
# touch private tokens. Chance is the majority-class rate on test for accuracies and 0 for R².

# %%
groups = evaluate.group_summary(info)
workbook.record("03 information map (probe score on test; accuracy, or R² for phases)",
                **{f"{factor} ({group}) from {column}": value for (group, factor, _), row in groups.iterrows()
                   for column, value in row.items()})
groups.round(3)

# %% [markdown]
# ## Leakage: do shared tokens carry private factors?
# A private factor is seen by one modality only. If the *other* modality's shared tokens decode it above chance,
# information leaks through the alignment (the other sensor cannot see it, so it could only have come from a
# correlation in the data — SynthTouch draws factors independently, so there is none to exploit).

# %%
leaks = evaluate.leakage(info)
fig = plots.leakage(leaks)
workbook.save_figure(fig, "03_leakage")
workbook.record("03 leakage (probe accuracy on test)",
                **{f"{row.factor}: {column}": row[column] for _, row in leaks.iterrows()
                   for column in ("own private", "own shared", "other shared (leakage)", "chance")})
display(leaks.round(3))
fig

# %% [markdown]
# ## Where each register looks
# Attention of each register over the image patches in the last block, for one test sample, first register to
# last: joint attention (FlexTok-style default model) and cross-attention (FluxTalk-style). The patch grid is
# 8×8 over a 64×64 image.

# %%
fluxtalk = train.load_aligner(design_runs["fluxtalk"]).model
sample = test_set[0]
rows = {f"{name} · {m}": (sample[m], evaluate.attention_maps(net, m, test_features[m], 0))
        for name, net in (("joint (default)", model), ("cross (fluxtalk)", fluxtalk)) for m in cfg.model.modalities}
fig = plots.attention_maps(rows)
workbook.save_figure(fig, "03_attention_maps")
fig

# %% [markdown]
# ## The shared embeddings of both modalities
# One PCA of the L2-normalised shared embeddings (k = n_shared) of vision and touch test items, coloured by a
# shared factor (texture), a vision-only factor (colour) and a touch-only factor (hardness). Aligned modalities
# overlap; the shared factor should form clusters, the private ones should not.

# %%
points = evaluate.project_2d({m: e.embeddings[k_shared] for m, e in test_encoded.items()})
fig = plots.embedding_views(points, test_set.factor_table(), ["texture", "color", "hardness"],
                            dict(SynthTouch.FACTORS))
workbook.save_figure(fig, "03_embeddings")
fig

# %% [markdown]
# ## Nearest neighbours at every k
# Drag the slider: a vision query (left) and its five nearest touch items at that prefix length, with their
# factors in group colours (frame: green = the query's own pair, blue = same shared factors, red = different).
# The static figure below shows a few k at once, so the notebook also reads without a running kernel.

# %%
viewer = evaluate.NeighbourViewer(test_encoded, test_set, query=0)
display(viewer.widget)
fig = viewer.static_figure([1, 2, k_shared])
workbook.save_figure(fig, "03_neighbours")
fig
