# %% [markdown]
# # 02 · Phase 1: aligning ordered register tokens
#
# Per modality, a small transformer reads the frozen features and writes ordered register tokens. The first
# `n_shared` registers of the camera and of the touch sensor are pulled together by a symmetric InfoNCE loss;
# the remaining private registers must reconstruct their own modality's features (the preservation loss).
# Nested dropout keeps only a random prefix of the registers at each step, so every prefix learns to stand on
# its own.
#
# First we train the CPU default (`configs/default.yaml`) and watch the loss live; then we compare the three
# design lines of the project — FlexTok-style registers, FluxTalk-style registers and the MLP-adapter baseline —
# trained on the same cached features by the study (`study.py`).

# %%
import pandas as pd

import demo
import evaluate
import phase1
import plots_training
import study
import train
import workbook

smoke, run_dir = workbook.start()
SMOKE = workbook.smoke_sizes(workbook.SMOKE_PHASE1)
cfg = phase1.load_config(None, output_dir=str(run_dir / "phase1" / "default"), **SMOKE)
cfg.model

# %% [markdown]
# ## Training the default configuration
# The plot redraws as training runs: the loss and its parts per step, and validation retrieval R@1 after each
# epoch (vision→touch and back, exact pair and same shared factors). Interrupting the cell saves a checkpoint;
# running it again resumes, and a finished run is reused.

# %%
live = plots_training.LiveLoss("Phase-1 training, configs/default.yaml")
default_run = train.ensure_trained(cfg, callback=live, threads=demo.threads)  # threads: make demo's share of the cores
minutes = train.training_minutes(default_run)
workbook.save_figure(plots_training.loss_curves(train.read_metrics(default_run),
                                               "Phase-1 training, configs/default.yaml"), "02_default_training")
print(f"{default_run}: trained in {minutes:.1f} min (features were cached by notebook 01)")

# %% [markdown]
# ## Retrieval on the test split, for every prefix length
# `eval.json` holds the test-split table: every row a prefix length k, every column a metric, all from one
# forward pass. At k = `n_shared` the shared embedding is complete; larger k only add private tokens, which the
# retrieval does not use, while the reconstruction of each modality's own features keeps improving.

# %%
table = evaluate.read_eval(default_run / "eval.json")
k_shared = cfg.model.n_shared
headline = table.loc[k_shared]
workbook.record("02 phase 1 (configs/default.yaml)", **{
    "training minutes": minutes,
    **{f"{name} at k={k_shared}": headline[name] for name in headline.index if "R@1" in name or "chance@1" in name}})
table.filter(regex="R@1|recon|chance@1").round(3)

# %% [markdown]
# ## Three design lines on the same features
# Each design line takes its register layout, attention, dropout and losses from `configs/<name>.yaml` and keeps
# the testbed's data, encoders and width (`phase1.design_on_testbed`), so the comparison is fair:
# **flextok** (32 registers, 8 shared, joint attention, power-of-two nested dropout, preservation loss),
# **fluxtalk** (4 registers, 3 overlapping + 1 complementary, cross-attention, linear nested dropout,
# complementary L2 + diversity), and **adapter** (the seed package's MLP adapters with Matryoshka + CLIP loss,
# one embedding, no registers) — the baseline the registers must beat.
#
# They are variants of the study (`python study.py --variants "flextok design" "fluxtalk design" "adapter design"
# --seeds 0`). `study.finished_run` finds your own runs in `runs/study` when you have
# trained them, and otherwise the reference results shipped in `docs/study` (the runs' configs, metrics and
# evaluation tables), so this demo trains only the default above. The `results` column says whose each row is; the
# reference's training minutes are of the machine that trained it, not yours.

# %%
rows = {}
for design in ("flextok", "fluxtalk", "adapter"):
    design_run = study.finished_run(f"{design} design")
    design_cfg = phase1.run_config(design_run)
    model = phase1.build_model(design_cfg)
    k = model.design.shared_k
    result = evaluate.read_eval(design_run / "eval.json").loc[k]
    rows[study.label(design, design_run)] = {"results": study.results_of(design_run), "registers": model.n_tokens, "shared": k, "attention": design_cfg.model.attention,
                    "nested dropout": design_cfg.model.nested_dropout,
                    "trainable parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                    "training minutes": train.training_minutes(design_run),
                    **{name: result[name] for name in result.index if "R@" in name and "->" in name}}
comparison = pd.DataFrame.from_dict(rows, orient="index")
comparison.round(3)

# %% [markdown]
# The bar chart shows retrieval with each design's full shared embedding. Exact-pair recall asks for the very
# same surface instance (the pattern phase decides it); factor-level recall asks only for the same shared factors.

# %%
metrics = [c for c in comparison.columns if "R@1" in c]
fig = plots_training.design_comparison(comparison, metrics)
workbook.save_figure(fig, "02_design_lines")
workbook.record("02 design lines", **{f"{design}: {name}": comparison.loc[design, name]
                                      for design in comparison.index for name in metrics if "vision->touch" in name})
fig
