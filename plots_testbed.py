"""The figures of the testbed before any training (notebook 01): samples (`sample_grid`), one factor changed at a
time (`render_variations`), which modality sees which factor (`factor_visibility`) and what the frozen encoders
pass on of each factor (`testbed_audit`)."""
from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from plots import (CHANCE_STYLE, GROUP_COLORS, MODALITY_MARKERS, WIDTH, color_factor_labels, group_legend,
                   show_content, wrapped)
from synthtouch import SynthTouch


def sample_grid(samples: list[dict], title: str = "SynthTouch samples: camera (top), touch sensor (bottom)") -> Figure:
    """Vision over touch for each sample, its caption underneath with each adjective in its group colour."""
    columns = min(4, len(samples))  # four samples a band: the caption words under each stay readable
    bands = math.ceil(len(samples) / columns)
    fig = Figure(figsize=(WIDTH, 4.6 * bands + 0.8), layout="constrained")
    axes = fig.subplots(2 * bands, columns, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, sample in enumerate(samples):
        band, col = divmod(i, columns)
        vision, touch = axes[2 * band, col], axes[2 * band + 1, col]
        for ax in (vision, touch):
            ax.axis("on")
        show_content(vision, sample["vision"])
        show_content(touch, sample["touch"])
        for line, name in enumerate(SynthTouch.FACTORS):
            adjective = SynthTouch.ADJECTIVES[name][sample["factors"][name]]
            touch.text(0.5, -0.06 - 0.1 * line, adjective, transform=touch.transAxes, ha="center", va="top",
                       fontsize=8, color=GROUP_COLORS[SynthTouch.factor_groups[name]])
        if col == 0:
            vision.set_ylabel("vision")
            touch.set_ylabel("touch")
    group_legend(fig, SynthTouch.factor_groups.values(), loc="outside lower center", ncols=len(GROUP_COLORS))
    fig.suptitle(f"{title};\ncaption words coloured by factor group", fontsize=11)
    return fig


def render_variations(dataset, base: dict, changes: list[tuple[str, str]], seed: int = 0) -> Figure:
    """`dataset.render` of `base`, then of `base` with one factor changed per column. Under each image:
    how many pixels moved against the base, so the reader sees which sensor a factor reaches."""
    columns = [("base", base)] + [(f"{name} → {value if isinstance(value, str) else 'other tiles'}",
                                   {**base, name: value}) for name, value in changes]
    rendered = [dataset.render(factors, seed) for _, factors in columns]
    per_band = 5  # changes a band: each band starts with the base column, so every change sits beside it
    bands = math.ceil((len(columns) - 1) / per_band)
    n_cols = 1 + min(per_band, len(columns) - 1)
    fig = Figure(figsize=(WIDTH, (2 * WIDTH / n_cols + 0.9) * bands + 0.5), layout="constrained")
    axes = fig.subplots(2 * bands, n_cols, squeeze=False)
    for band in range(bands):
        shown = [0] + list(range(1 + band * per_band, min(len(columns), 1 + (band + 1) * per_band)))
        for col in range(n_cols):
            if col >= len(shown):
                axes[2 * band, col].axis("off"), axes[2 * band + 1, col].axis("off")
                continue
            i = shown[col]
            label, sample = columns[i][0], rendered[i]
            group = SynthTouch.factor_groups[label.split(" ")[0]] if i else None
            axes[2 * band, col].set_title(label.replace(" → ", "\n→ "), fontsize=9,
                                          color=GROUP_COLORS[group] if group else "black")
            for row, modality in enumerate(("vision", "touch")):
                ax = axes[2 * band + row, col]
                show_content(ax, sample[modality])
                if i:
                    moved = (sample[modality] - rendered[0][modality]).abs().amax(0).gt(1e-6).float().mean().item()
                    ax.set_xlabel(f"{100 * moved:.0f}% pixels\nchanged", fontsize=8)
        axes[2 * band, 0].set_ylabel("vision")
        axes[2 * band + 1, 0].set_ylabel("touch")
    fig.suptitle("render(): one factor changed per column\n(same seed, so the noise is identical)", fontsize=11)
    return fig


def factor_visibility(factor_groups: dict[str, str], title: str = "Which modality sees which factor") -> Figure:
    """Factors × (vision, touch, text caption): a filled cell where that modality carries the factor."""
    names = list(factor_groups)
    sees = {"shared": ("vision", "touch"), "vision": ("vision",), "touch": ("touch",)}
    fig = Figure(figsize=(4.2, 0.42 * len(names) + 1.2), layout="constrained")
    ax = fig.subplots()
    columns = ["vision", "touch", "caption"]
    for row, name in enumerate(names):
        group = factor_groups[name]
        in_caption = name in SynthTouch.FACTORS  # continuous phases are instance detail, not words
        for col, modality in enumerate(columns):
            seen = in_caption if modality == "caption" else modality in sees[group]
            ax.add_patch(Rectangle((col + 0.08, row + 0.08), 0.84, 0.84, color=GROUP_COLORS[group] if seen else "0.93"))
    ax.set_xlim(0, len(columns))
    ax.set_ylim(len(names), 0)
    ax.set_xticks(np.arange(len(columns)) + 0.5, columns)
    ax.set_yticks(np.arange(len(names)) + 0.5, names)
    color_factor_labels(ax.get_yticklabels(), factor_groups)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    group_legend(ax, factor_groups.values(), loc="upper left", bbox_to_anchor=(1.02, 1))
    ax.set_title(title)
    return fig


def testbed_audit(table, share_target: float, readable_target: float,
                  title: str = "What the frozen encoders pass on, factor by factor (before any training)") -> Figure:
    """audit.audit's table in two panels, one row per factor (coarse, then fine, then the sensors' noise), factor
    labels in their group colour. Left: the share of the frozen tokens' variance a factor moves, vision and touch
    bars; right: the linear probe's score above chance from the pixels (hollow) and the frozen tokens (filled).
    Dashed: the targets fine factors must reach (their shares between them, each one's score)."""
    order = list(dict.fromkeys(table.sort_values("scale", key=lambda s: s.map({"coarse": 0, "fine": 1, "": 2}),
                                                 kind="stable").factor))
    groups = dict(zip(table.factor, table.group))
    y = np.arange(len(order))
    fig = Figure(figsize=(WIDTH, 0.3 * len(order) + 2.4), layout="constrained")
    shares, scores = fig.subplots(1, 2, sharey=True)
    for i, m in enumerate(("vision", "touch")):
        part = table[table.modality == m].set_index("factor").reindex(order)
        shares.barh(y + (i - 0.5) * 0.38, part["variance share"], height=0.38, color=GROUP_COLORS[m], label=m)
        scores.scatter(part["pixels"].clip(lower=0), y + (i - 0.5) * 0.3, marker=MODALITY_MARKERS[m],
                       facecolors="none", edgecolors=GROUP_COLORS[m], label=f"{m}: pixels")
        scores.scatter(part["frozen tokens"].clip(lower=0), y + (i - 0.5) * 0.3, marker=MODALITY_MARKERS[m],
                       color=GROUP_COLORS[m], label=f"{m}: frozen tokens")
    shares.axvline(share_target, **CHANCE_STYLE)
    scores.axvline(readable_target, **CHANCE_STYLE)
    shares.set_yticks(y, order)
    color_factor_labels(shares.get_yticklabels(), groups)
    shares.invert_yaxis()
    shares.set_xlabel("share of the frozen tokens'\nvariance it moves")
    scores.set_xlabel("linear probe score above chance\n(R² or accuracy; ≤ 0 drawn at 0)")
    scores.set_xlim(-0.02, 1.02)
    for ax in (shares, scores):
        ax.grid(axis="x", alpha=0.3)
    shares.legend(fontsize=8, loc="lower right")
    fig.legend(*scores.get_legend_handles_labels(), fontsize=8, loc="outside lower center", ncols=2)
    fig.suptitle(wrapped(title, 70), fontsize=11)
    return fig
