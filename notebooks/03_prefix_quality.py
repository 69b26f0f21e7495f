# %% [markdown]
# # 03 · Coarse to fine: how good is every prefix of k tokens, and what does each token know?
#
# Register i never attends to registers after it, so one forward pass gives the representation for every
# prefix length k at once (a test proves it equals k separate passes with only k registers). Nested dropout
# trains every prefix to stand on its own. SynthTouch has information at two scales: *coarse* factors about the
# whole surface (texture, orientation, roughness, colour, lighting, hardness, pressure, the pattern's phase)
# and *fine* ones about its parts, one value per tile of a grid (wear, seen and felt; stains, seen only;
# compliance, felt only). So a short prefix can hold the coarse picture and longer ones add the detail.
#
# This notebook measures quality against k for each nested-dropout mode and design line, compares the designs
# that keep private information out of the shared tokens (leakage against k), reads out with probes which
# token carries which factor (the *information map*), shows where registers look in the image, and ends with
# a slider over k that shows a query's nearest neighbours of the other modality.

# %%
import os

import pandas as pd
from IPython.display import HTML, Markdown, display

import audit
import evaluate
import information
import phase1
import plots_prefix
import plots_training
import prefixes
import retrieval
import study
import train
import widgets
import workbook
from data import SynthTouch

smoke, run_dir = workbook.start()
# the same sizes and run folders as notebook 02, so runs trained there are reused here
SMOKE = workbook.smoke_sizes(workbook.SMOKE_PHASE1)
cfg = phase1.load_config(None, output_dir=str(run_dir / "phase1" / "default"), **SMOKE)
print(f"smoke mode: {smoke}; {cfg.n_train} train / {cfg.n_test} test samples, {cfg.epochs} epochs per run")

# %% [markdown]
# ## The runs
# The default model is notebook 02's run. Everything it is compared with is a variant of the study
# (`study.py`, seed 0), each changing one thing of `configs/default.yaml`: the nested-dropout mode
# (`power_of_two`, the default: k drawn from 1, 2, 4, …; `uniform`: k drawn from 1…R; `linear`: drop
# probability rising from 0 on the first register to 0.5 on the last; `none`: always all registers), the design
# line (the three of notebook 02 at testbed width), or the leakage design (the default without its guard, and
# each guard alone in its place). `study.finished_run` takes your own run from `runs/study` when you have trained
# it (`make study`), otherwise the reference results in `docs/study`: the same runs' configs, metrics and
# evaluation tables (no weights). The table says which is which (the reference's training minutes are of the machine
# that trained them, not yours), and on which SynthTouch each was trained: the
# reference runs are of SynthTouch v4, before its fine factors were made to move the frozen features (notebook 01),
# so compare them with the default only after `make study` has retrained them on today's testbed.

# %%
default_run = train.ensure_trained(cfg)
dropout_runs = {"power_of_two": default_run,
                **{mode: study.finished_run(f"{mode} nested dropout") for mode in ("uniform", "linear")},
                "none": study.finished_run("no nested dropout")}
design_runs = {design: study.finished_run(f"{design} design") for design in ("flextok", "fluxtalk", "adapter")}
guard_runs = {"default": default_run, **{variant: study.finished_run(variant) for variant in study.LEAKAGE_VARIANTS}}
everything = {**{f"dropout {m}": r for m, r in dropout_runs.items()}, **{f"{d} design": r for d, r in design_runs.items()},
              **{f"guard: {g}": r for g, r in guard_runs.items()}}
pd.DataFrame({"run folder": {name: os.path.relpath(run) for name, run in everything.items()},
              "results": {name: study.results_of(run) for name, run in everything.items()},
              "testbed": {name: study.testbed_of(run) for name, run in everything.items()},
              "training minutes": {name: round(train.training_minutes(run), 1) for name, run in everything.items()}})

# %% [markdown]
# ## Quality vs k, per nested-dropout mode
# Every curve comes from the run's `eval.json` (test split, one forward pass). Retrieval uses the shared
# embedding, the mean of the first min(k, n_shared) tokens, so it can only change up to k = n_shared; the
# preservation cosine (each modality reconstructing its own frozen features) keeps using every kept token. In the
# default, exact-pair retrieval grows up to n_shared: each shared register reads a longer part of the input
# (`model.encoder_readin_shared_nested`), and a pair is trained at one k (`model.nested_dropout_per_pair`; drawn
# per modality, a short vision prefix was pulled onto a long touch one, and every prefix became one embedding).
# Without nested dropout, the model only ever saw all registers in training, so short prefixes are off the
# training distribution. That shows in retrieval from a short shared prefix; the reconstruction of a short prefix
# by a read-out solved for that k (`model.decoder_readout_solved`) does not need it (the README's figure).

# %%
dropout_tables = {mode: evaluate.read_eval(run / "eval.json") for mode, run in study.labelled(dropout_runs).items()}
recalls = ["vision->touch R@1 pair", "vision->touch R@1 factor", "touch->vision R@1 pair"]
chance = {"vision->touch R@1 pair": "chance@1 pair", "vision->touch R@1 factor": "chance@1 factor",
          "touch->vision R@1 pair": "chance@1 pair"}
fig = plots_prefix.prefix_curves(dropout_tables, recalls + ["vision recon cos", "touch recon cos"],
                                 "Quality vs prefix length k, per nested-dropout mode (test split)", chance)
workbook.save_figure(fig, "03_quality_vs_k_dropout")
fig

# %% [markdown]
# Is the preservation curve the tokens' or the decoder's? Beside the trained decoder's cosine, the same cosine
# from a ridge regression of the frozen features on the same first k tokens (`evaluate.readout_cosine`: fit on
# 2000 training rows, its strength chosen on the validation split, scored on test). Where the decoder's curve
# lies below the read-out's, the tokens hold information the decoder does not use. Trained by gradient steps
# alone, the decoder's linear read-out stayed well below it; the default solves it in closed form at the end of
# training instead, one map per k (`model.decoder_readout_solved`, `readout_fit.py`), so the curve is the tokens'.
# A run trained with `--set model.decoder_readout_solved=false` shows the gap come back.

# %%
fig = plots_prefix.prefix_curves(evaluate.decoder_and_readout(dropout_tables["power_of_two"], cfg.model.modalities),
                                 [f"{m} preservation cosine" for m in cfg.model.modalities],
                                 "The default's preservation cosine: trained decoder vs ridge read-out (test split)")
workbook.save_figure(fig, "03_decoder_vs_readout")
fig

# %% [markdown]
# Is quality non-decreasing in k? For every recall, `prefix_drops` finds the largest drop from a shorter prefix
# to a longer one and compares it with two standard errors of the difference of two recalls on the test set
# (binomial noise, sqrt(p(1−p)/n + p′(1−p′)/n)). The table says, per mode, whether any drop is beyond that noise,
# and how much R@1 the shortest prefix keeps relative to the full shared embedding.

# %%
n_queries = cfg.n_test
k_shared = cfg.model.n_shared
summary = evaluate.prefix_summary(dropout_tables, n_queries, k_shared)
workbook.record("03 nested-dropout ablation (vision->touch, test)",
                **{f"{mode}: {name}": value for mode, row in summary.iterrows() for name, value in row.items()})
summary.round(3)

# %% [markdown]
# ## Quality vs k, per design line
# FlexTok-style registers (joint attention, 32 registers of which 8 shared), FluxTalk-style (cross-attention,
# 4 registers of which 3 overlapping) and the MLP adapter, which has one embedding and so one point at k = 1
# (with a dashed line across, for comparison with every prefix).

# %%
design_tables = {design: evaluate.read_eval(run / "eval.json") for design, run in study.labelled(design_runs).items()}
fig = plots_prefix.prefix_curves(design_tables, recalls, "Quality vs prefix length k, per design line (test split)",
                                 chance)
workbook.save_figure(fig, "03_quality_vs_k_designs")
workbook.record("03 design lines: vision->touch R@1 pair at k=1 and at the full shared embedding",
                **{f"{design}: k={k}": table.loc[k, "vision->touch R@1 pair"]
                   for design, table in design_tables.items() for k in sorted({1, table.index[-1]})})
fig

# %% [markdown]
# ## Mean ± std over seeds
# One training run is one draw: the same command gives different numbers with another seed. `make study`
# trains every variant with three seeds and writes `runs/study/study.md`. The figure shows the headline numbers of
# every design, mean ± std over its seeds, grouped by family: your `runs/study` where you have trained a variant, the
# reference results in `docs/study` otherwise (starred). Every number of the study is in the table under it (click
# to open).

# %%
study_rows = study.read_rows()
fig = plots_training.study_summary(study.per_variant(study_rows), study.family)
workbook.save_figure(fig, "03_study")
display(fig)
HTML("<details><summary><b>The whole study table</b>: mean ± std over seeds, per design, in parts</summary>"
     + "".join(f"<h4>{title}</h4>{part.to_html()}" for title, part in study.summary_parts(study_rows).items())
     + "</details>")

# %% [markdown]
# ## Leakage against k, per design
# For each modality: how well the *own* private factors (colour, lighting, stains for vision; hardness,
# pressure, compliance for touch) can be read from its aligned shared embedding at every k — the worst factor,
# with the non-linear probe (`probes.py`: ridge on an RBF kernel, its width and strength chosen on the validation
# split) fit on 2000 training rows and scored on test, normalised so that 0 is chance and 1 perfect. Beside it, the coarse shared factors from the same embedding, which must stay
# high. A design that keeps private information out of the shared tokens has low leakage at every k.

# %%
guard_tables = {name: evaluate.read_eval(run / "eval.json") for name, run in study.labelled(guard_runs).items()}
leak_metrics = [f"{m} {measure} [non-linear]" for measure in ("leak into shared embedding (max)",
                                                              "shared factors from shared embedding (mean)")
                for m in cfg.model.modalities]
fig = plots_prefix.prefix_curves(guard_tables, leak_metrics, "Own private factors in the shared embedding vs k, per "
                                 "design (non-linear probes, test split)")
workbook.save_figure(fig, "03_leakage_vs_k")
workbook.record("03 leakage designs at k = n_shared (non-linear probe, normalised)",
                **{f"{name}: {metric}": table.loc[k_shared, metric] for name, table in guard_tables.items()
                   for metric in leak_metrics if metric in table})
fig

# %% [markdown]
# ## The trade-off, design by design
# Each design as one point: how much of its own private factors the aligned shared embedding gives away (the worst
# factor of either modality, non-linear probe, k = n_shared) against factor-level vision→touch R@1 at the same k,
# mean ± std over the seeds trained (your `runs/study` where you have trained a variant, the reference results
# otherwise). Colour is a design's family (`study.FAMILIES`: what kind of change it makes to the default), the marker
# the design within it. The shaded corner is what the workbook aims for (`study.TARGET`): leakage ≤ 0.15 and
# R@1 ≥ 0.9. The list under the figure reads the same table.

# %%
tradeoff = study.tradeoff(study_rows)
fig = plots_training.tradeoff(tradeoff, study.LEAK, study.RETRIEVAL, study.TARGET[study.LEAK],
                              study.TARGET[study.RETRIEVAL], study.family)
workbook.save_figure(fig, "03_tradeoff")
display(fig)
Markdown(study.tradeoff_summary(tradeoff))

# %% [markdown]
# **How the designs differ.** Without a leakage guard, the preservation decoder must rebuild all of a modality's
# features from the shared tokens whenever nested dropout keeps k ≤ n_shared, which pushes every private factor into
# them, and InfoNCE never takes it out again (a private factor can sit in directions the other modality never uses,
# where it costs InfoNCE nothing). The default reads the shared tokens through a stop-gradient for reconstruction
# and adds a confidence-weighted alignment term (`core.alignment_loss`) that keeps pulling matched pairs together;
# the other guards replace it, each alone. A continuous embedding can still hold a small leftover of a private
# factor, and the non-linear probe rescales what it reads, so it finds it. The leftover sits in the directions
# training never shaped, so after training the default keeps only the directions of its shared embedding along
# which vision and touch agree (`agreement.py`, `model.shared_agreement`), and there it replaces what each modality
# says by what that predicts of the other's (lighting moves the wear directions too, and lighting predicts nothing
# of touch). Limiting what a token can carry is the
# other route: the *token bottleneck* (fewer numbers per token) and *FSQ tokens*, FlexTok's own token format (a few
# numbers per token, each rounded to a few levels), which leave no small leftover to find; *FSQ shared tokens*
# rounds the shared tokens only, so the private ones keep their detail. Rounded tokens learn slowly: the wider
# codes (*12-number code*, *24-number code*), the longer trainings (*28 epochs*, *42 epochs*) and the trainings on
# unrounded codes first (*warm-up*) ask whether the code's width, the training's length or the rounding holds
# retrieval back.
#
# How much a probe finds also depends on how many rows it is fit on and how its regularisation is chosen: the
# reference runs in `docs/study` were probed on the 500 validation rows with fixed settings, which reads less than
# the tokens hold; a run you train now is probed on 2000 training rows with its regularisation chosen on the
# validation split.

# %% [markdown]
# ## Which factor retrieval gets wrong
# Factor-level R@1 counts a vision query as found when its top-1 touch item has the same texture, orientation and
# roughness. Left: for the default (this notebook's run, from its weights) and for the design closest to the target
# corner (`study.closest_to_target`, from the trade-off table above, with its `confusion.csv`, which every
# SynthTouch evaluation writes), the share of queries whose top-1 item has another value of each factor. Right:
# which textures are taken for which, row by row: a bright diagonal means textures are told apart, bright cells off
# it are the pairs retrieval confuses.

# %%
# the default's test split through its weights, once: this figure and the ones further down read it
test_set, test_features = phase1.split_data(cfg, "test")
model = phase1.load_aligner(default_run).model
test_encoded = prefixes.encode_all(model, test_features, cfg.model.prefix_lengths, progress=True)

# %%
closest_run = study.finished_run(study.closest_to_target(tradeoff), needs=("confusion.csv",))
closest = study.label(study.closest_to_target(tradeoff), closest_run)
confusions = {"default": retrieval.retrieval_confusion(test_encoded, test_set.factor_table(), [k_shared]),
              closest: evaluate.read_confusion(closest_run)}
recall = {"default": dropout_tables["power_of_two"].loc[k_shared, "vision->touch R@1 factor"],
          closest: evaluate.read_eval(closest_run / "eval.json").loc[k_shared, "vision->touch R@1 factor"]}
shares = {name: retrieval.top1_differs(table, k_shared) for name, table in confusions.items()}
workbook.record("03 vision->touch queries whose top-1 has another value, k = n_shared (test)",
                **{f"{name}: {factor}": share for name, row in shares.items() for factor, share in row.items()})
fig = plots_training.retrieval_failures(shares, {name: retrieval.confusion_matrix(table, k_shared, "texture")
                                                 for name, table in confusions.items()}, "texture", recall)
workbook.save_figure(fig, "03_retrieval_failures")
fig

# %% [markdown]
# ## The information map: which token knows which factor
# For the default model and for the same model without a leakage guard: a linear probe for every factor from
# every single register token and from the shared and private token groups of each modality — ridge regression
# on one-hot codes for discrete factors (accuracy of the largest), on (cos, sin) of the phase for the phases (R²)
# and on the tiles' values for the fine factors (R² averaged over the tiles). Probes are fit on 2000 training
# rows, their regularisation chosen on the validation split, and scored on test, when the run is evaluated
# (`information.csv` beside `eval.json`). Cells show the score above chance, (score − chance)/(1 − chance), so 0
# is chance and 1 is perfect; a score at or below chance is grey ("none"); factor names are coloured by who sees
# them.

# %%
info = evaluate.read_information(default_run)
unguarded_info = evaluate.read_information(guard_runs["no leakage guard"])
fig = plots_prefix.information_map(info, n_shared=k_shared, title="Information map of the default model")
workbook.save_figure(fig, "03_information_map")
fig

# %%
fig = plots_prefix.information_map(unguarded_info, n_shared=k_shared, title=study.label(
    "… and of the same model without a leakage guard", guard_runs["no leakage guard"]))
workbook.save_figure(fig, "03_information_map_unguarded")
fig

# %% [markdown]
# And the map of the design that keeps the private factors out of the shared tokens: the shared tokens rounded
# to FSQ codes. Left of the white line, the own private factors' columns should now be near 0.

# %%
fsq_info = evaluate.read_information(guard_runs["FSQ shared tokens"])
fig = plots_prefix.information_map(fsq_info, n_shared=k_shared, title=study.label("… and of FSQ shared tokens",
                                                                                  guard_runs["FSQ shared tokens"]))
workbook.save_figure(fig, "03_information_map_fsq")
fig

# %% [markdown]
# The order in one picture: the mean probe score of each kind of factor from each single token. Coarse factors
# (solid) should be readable from the first token on; fine ones (dashed) only from later tokens; private
# factors of the own modality (its colour) only from the private tokens after the white line of the map above.

# %%
order = information.order_by_token(info)
fig = plots_prefix.order_by_token(order)
workbook.save_figure(fig, "03_order_by_token")
fig

# %% [markdown]
# The numbers behind the map, from the token groups: shared factors should be decodable from *both*
# modalities' shared tokens, vision-only factors from the vision private tokens, touch-only factors from the
# touch private tokens. Chance is what a probe that learned nothing scores: for accuracies, the test share of the
# training rows' most common class; 0 for R².

# %%
groups = information.group_summary(info)
workbook.record("03 information map (probe score on test; accuracy, or R² for phases and fine factors)",
                **{f"{factor} ({group}) from {column}": value for (group, factor, _), row in groups.iterrows()
                   for column, value in row.items()})
groups.round(3)

# %% [markdown]
# ## Private factors, token group by token group
# Each private factor from the own modality's private and shared tokens (linear probes). The third bar is a
# sanity control, not a leakage measure: the *other* modality's shared tokens are computed from a sensor that
# never sees the factor (SynthTouch renders it bit-identically whatever its value), so they must sit at chance
# for any model, trained or not. Leakage is the own shared tokens' bar, and the curves above.

# %%
leaks = information.leakage(info)
fig = plots_prefix.leakage(leaks)
workbook.save_figure(fig, "03_leakage")
workbook.record("03 private factors by token group (linear probe accuracy on test)",
                **{f"{row.factor}: {column}": row[column] for _, row in leaks.iterrows()
                   for column in ("own private", "own shared", "other shared (control)", "chance")})
display(leaks.round(3))
fig

# %% [markdown]
# ## How loud a leak is
# A probe says whether a factor can be read at all, not how much of what it reads moves with it. So each factor is
# redrawn alone, everything else and the sensor noise fixed, and the figure shows the share of each stage's variance
# that moves with it: the frozen tokens the model reads, the default's shared embedding at k = n_shared, and its
# private tokens (`audit.variance_shares` with `audit.run_stages`, notebook 01's measure carried down the model). A
# private factor's bar at the shared embedding is how loud its leak is, next to how loud it was in the frozen tokens;
# a factor a sensor never sees moves nothing at any stage.

# %%
stage_shares = audit.variance_shares(phase1.run_config(default_run), n=6 if smoke else 48, redraws=3,
                                     stages=audit.run_stages(default_run))
fig = plots_prefix.factor_stages(stage_shares)
workbook.save_figure(fig, "03_factor_stages")
workbook.record("03 share of the shared embedding's variance each factor moves alone (k = n_shared)",
                **{f"{r.modality}: {r.factor}": r.share for r in stage_shares.itertuples() if r.stage == "shared embedding"})
fig

# %% [markdown]
# ## Where each register looks
# Attention of each register over the image patches in the last block, for one test sample, first register to
# last: joint attention (the FlexTok-style default model) and, when you have trained it (`python study.py
# --variants "fluxtalk design" --seeds 0`; reference results carry no weights), cross-attention (FluxTalk-style).
# The patch grid is 8×8 over a 64×64 image.

# %%
nets = {"joint (default)": model}
if (design_runs["fluxtalk"] / "checkpoint").exists():
    nets["cross (fluxtalk)"] = phase1.load_aligner(design_runs["fluxtalk"]).model
sample = test_set[0]
rows = {f"{name} · {m}": (sample[m], evaluate.attention_maps(net, m, test_features[m], 0))
        for name, net in nets.items() for m in cfg.model.modalities}
fig = plots_prefix.attention_maps(rows)
workbook.save_figure(fig, "03_attention_maps")
fig

# %% [markdown]
# ## The shared embeddings of both modalities
# One PCA of the L2-normalised shared embeddings (k = n_shared) of vision and touch test items, coloured by a
# shared factor (texture), a vision-only factor (colour) and a touch-only factor (hardness). Aligned modalities
# overlap; the shared factor should form clusters, the private ones should not.

# %%
points = evaluate.project_2d({m: e.embeddings[k_shared] for m, e in test_encoded.items()})
fig = plots_prefix.embedding_views(points, test_set.factor_table(), ["texture", "color", "hardness"],
                                   dict(SynthTouch.FACTORS))
workbook.save_figure(fig, "03_embeddings")
fig

# %% [markdown]
# ## Nearest neighbours at every k
# Drag the slider: a vision query (left) and its five nearest touch items at that prefix length, with their
# factors in group colours (frame: green = the query's own pair, blue = same shared factors, red = different).
# The static figure below shows a few k at once, so the notebook also reads without a running kernel.

# %%
viewer = widgets.NeighbourViewer(test_encoded, test_set, query=0)
display(viewer.widget)
fig = viewer.static_figure([1, 2, k_shared])
workbook.save_figure(fig, "03_neighbours")
fig
