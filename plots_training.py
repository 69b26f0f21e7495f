"""The figures of phase-1 training and of the study's trained runs side by side (notebooks 02 and 03): loss curves
(`loss_curves`, live while training: `LiveLoss`), design lines on the same features (`design_comparison`),
leakage against retrieval (`tradeoff`), every design's mean ± std (`study_summary`) and which factor values
retrieval mixes up (`retrieval_failures`)."""
from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator

from plots import WIDTH, color_labels, panel_grid, wrapped


def loss_curves(rows: list[dict], title: str = "Phase-1 training") -> Figure:
    """Training loss (and its parts) per step and validation R@1 per epoch, from metrics.jsonl rows."""
    steps = [r for r in rows if r["kind"] == "step"]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    fig = Figure(figsize=(WIDTH, 3.6), layout="constrained")
    loss_ax, val_ax = fig.subplots(1, 2)
    parts = [k for k in (steps[0] if steps else {}) if k not in ("kind", "step", "epoch", "lr", "temperature")]
    for i, part in enumerate(parts):
        loss_ax.plot([r["step"] for r in steps], [r[part] for r in steps], label=part, color=f"C{i}",
                     linewidth=2 if part == "loss" else 1)
    loss_ax.plot([r["step"] for r in epochs], [r["train loss"] for r in epochs], "ko", markersize=4,
                 label="epoch mean")
    loss_ax.set(xlabel="optimiser step", ylabel="loss (nats)", title="training loss")
    if parts or epochs:
        loss_ax.legend(fontsize=8)
    recalls = [k for k in (epochs[0] if epochs else {}) if k.startswith("val ") and "R@1" in k]
    for i, key in enumerate(recalls):
        val_ax.plot([r["epoch"] + 1 for r in epochs], [r[key] for r in epochs], marker="o", color=f"C{i}",
                    label=key[len("val "):])
    val_ax.set(xlabel="epoch", ylabel="R@1 (fraction)", title="validation retrieval\n(full shared embedding)",
               ylim=(0, 1))
    if recalls:
        val_ax.legend(fontsize=8)
    fig.suptitle(title)
    return fig


class LiveLoss:
    """A training callback that redraws `loss_curves` in place every `every` rows (Jupyter display handle);
    outside Jupyter it only collects the rows."""

    def __init__(self, title: str = "Phase-1 training", every: int = 5):
        self.rows, self.title, self.every, self.handle = [], title, every, None

    def __call__(self, row: dict):
        self.rows.append(row)
        if row["kind"] == "epoch" or len(self.rows) % self.every == 0:
            self.figure = loss_curves(self.rows, self.title)
            try:
                from IPython.display import display
            except ImportError:
                return
            if self.handle is None:
                self.handle = display(self.figure, display_id=True)
            else:
                self.handle.update(self.figure)


def design_comparison(table, metrics: list[str], title: str = "Design lines on the same cached features") -> Figure:
    """Grouped bars: one group per metric, one bar per design (rows of `table`), values written on the bars."""
    fig = Figure(figsize=(WIDTH, 4.2), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(table)
    x = np.arange(len(metrics))
    for i, (design, row) in enumerate(table.iterrows()):
        bars = ax.bar(x + (i - (len(table) - 1) / 2) * width, [row[m] for m in metrics], width, label=design)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(x, [m.replace(" R@", "\nR@") for m in metrics], fontsize=8)
    ax.set(ylabel="recall (fraction of queries)", ylim=(0, 1.05), title=title)
    fig.legend(*ax.get_legend_handles_labels(), fontsize=8, loc="outside lower center", ncols=len(table))
    return fig


def tradeoff(table, x: str, y: str, target_x: float, target_y: float, family=None,
             title: str = "What keeping private factors out costs, per design") -> Figure:
    """One point per design (rows of `table`, columns x, y and their "<name> std"; error bars where a design has
    several seeds), with the target region (x ≤ target_x, y ≥ target_y) shaded: a design inside meets both.
    `family(design)` groups designs: one colour per family, one marker per design within it, and the legend lists
    the designs under their family's name; without it every design has a colour (and past the palette's, a marker)
    of its own. A `source` column of "reference" marks the reference's results in the legend."""
    fig = Figure(figsize=(WIDTH, 5.6 + 0.09 * len(table)), layout="constrained")
    ax = fig.subplots()
    ax.add_patch(Rectangle((-0.1, target_y), target_x + 0.1, 1.1 - target_y, color="#2ca02c", alpha=0.12, lw=0))
    ax.text(-0.08, 1.04, "target", color="#2ca02c", fontsize=8, va="top")
    group = family or (lambda name: name)
    families = list(dict.fromkeys(map(group, table.index)))
    colors = matplotlib.colormaps["tab10" if len(families) <= 10 else "tab20"].colors
    markers = "osD^vP*X<>ph"
    handles, headers = [], []
    for f, name_of_family in enumerate(families):
        members = [name for name in table.index if group(name) == name_of_family]
        if family is not None:
            headers.append(len(handles))
            handles.append(Line2D([], [], linestyle="none", label=name_of_family))
        for j, name in enumerate(members):
            row = table.loc[name]
            notes = [f"{int(row['seeds'])} seeds"] if row.get("seeds", 1) > 1 else []
            notes += ["reference"] if row.get("source") == "reference" else []
            marker = markers[(j + f // len(colors)) % len(markers)]  # past the palette, families differ by marker too
            color = colors[f % len(colors)]
            ax.errorbar(row[x], row[y], xerr=row.get(f"{x} std"), yerr=row.get(f"{y} std"), fmt=marker, ms=6, capsize=2,
                        color=color)
            handles.append(Line2D([], [], marker=marker, ms=7, linestyle="none", color=color,  # the marker alone
                                  label=name + (f" ({', '.join(notes)})" if notes else "")))
    ax.set(xlabel=x + "\n(normalised probe score: 0 chance, 1 perfect; lower is better)", ylabel=y,
           xlim=(-0.1, 1.0), ylim=(0, 1.05), title=title)
    ax.xaxis.label.set_fontsize(8)
    legend = fig.legend(handles=handles, fontsize=7, loc="outside lower center", ncols=2)
    for i in headers:  # a family's name heads its designs
        legend.get_texts()[i].set_fontweight("bold")
    return fig


def study_summary(table, family, title: str = "Every design of the study: mean ± std over seeds (test split)") -> Figure:
    """study.per_variant's table (mean, "<column> std", seeds, source per design) as one panel per number, side by
    side: a design per row, grouped by family (one colour each, families in the table's order), its mean with a
    ± std bar. Designs whose results are the reference's are starred."""
    columns = [c for c in table.columns if not c.endswith(" std") and c not in ("seeds", "source")]
    families = list(dict.fromkeys(map(family, table.index)))
    order = sorted(table.index, key=lambda name: families.index(family(name)))  # stable: study order in a family
    colors = dict(zip(families, matplotlib.colormaps["tab10"].colors))
    fig, axes, _ = panel_grid(len(columns), len(columns), 0.19 * len(order) + 1.0, sharey=True)
    y = np.arange(len(order))
    for ax, column in zip(axes, columns):
        for i, name in enumerate(order):
            row = table.loc[name]
            ax.errorbar(row[column], i, xerr=row.get(f"{column} std"), fmt="o", ms=4, capsize=2,
                        color=colors[family(name)])
        for edge in np.flatnonzero([family(a) != family(b) for a, b in zip(order, order[1:])]):
            ax.axhline(edge + 0.5, color="0.8", linewidth=0.8)  # between families
        ax.set_title(wrapped(column, 18), fontsize=8)
        # a panel is about an inch wide: two or three ticks, or labels such as "0.25" run into each other
        ax.xaxis.set_major_locator(MaxNLocator(nbins=2))
        ax.grid(axis="x", alpha=0.3)
    reference = table.get("source", pd.Series(dtype=str)).reindex(order).eq("reference")
    axes[0].set_yticks(y, [f"{name} *" if ref else name for name, ref in zip(order, reference)], fontsize=7)
    axes[0].invert_yaxis()
    color_labels(axes[0].get_yticklabels(), [colors[family(name)] for name in order])
    fig.legend(handles=[Patch(color=colors[f], label=f) for f in families], fontsize=8, loc="outside lower center",
               ncols=3, title="family", title_fontsize=8)
    fig.suptitle(title + ("\n* the reference's results (docs/study), not yours" if reference.any() else ""), fontsize=10)
    return fig


def retrieval_failures(shares: dict, confusions: dict, factor: str, recall: dict | None = None,
                       title: str = "Where factor-level retrieval fails (vision→touch, top-1)") -> Figure:
    """Left: per shared factor, the share of queries whose top-1 item has another value of it, one bar per run
    (`shares`: run → Series factor → share; `recall`: run → R@1 factor, named in the legend). Right: one
    confusion matrix of `factor` per run (`confusions`: run → query value × retrieved value counts), each cell
    coloured by its share of the row, the count written on it. The bars fill the top row, the matrices the next."""
    fig = Figure(figsize=(WIDTH, 3.6 + WIDTH / len(confusions) + 0.4), layout="constrained")
    layout = [["bars"] * len(confusions), list(range(len(confusions)))]
    panels = fig.subplot_mosaic(layout, height_ratios=[3.6, WIDTH / len(confusions)])
    axes = [panels["bars"]] + [panels[i] for i in range(len(confusions))]
    factors = list(next(iter(shares.values())).index)
    width = 0.8 / len(shares)
    for i, (run, share) in enumerate(shares.items()):
        label = run if recall is None else f"{run} (R@1 factor {recall[run]:.3f})"
        bars = axes[0].bar(np.arange(len(factors)) + (i - (len(shares) - 1) / 2) * width, share[factors], width,
                           label=label)
        axes[0].bar_label(bars, fmt="%.3f", fontsize=7)
    axes[0].set_xticks(range(len(factors)), factors)
    top = max(float(share.max()) for share in shares.values())
    axes[0].set(xlabel="shared factor", ylabel="share of queries: top-1 item\nwith another value",
                ylim=(0, 1.15 * top + 0.01))  # head room for the bar labels
    axes[0].legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.01))  # above the bars, never over them
    for ax, (run, counts) in zip(axes[1:], confusions.items()):
        rows = counts.to_numpy()
        ax.imshow(rows / np.maximum(rows.sum(1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)  # a value no query had: 0
        for (r, c), count in np.ndenumerate(rows):
            ax.text(c, r, str(count), ha="center", va="center", fontsize=8,
                    color="white" if count > rows[r].sum() / 2 else "black")
        ax.set_xticks(range(len(counts.columns)), counts.columns, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(counts.index)), counts.index, fontsize=8)
        ax.set(xlabel=f"{factor} of the top-1 touch item", title=wrapped(run, 40))
        ax.title.set_fontsize(9)
    axes[1].set_ylabel(f"{factor} of the vision query")
    fig.suptitle(title)
    return fig
