"""The figures of coarse to fine (notebooks 03 and 05): quality vs prefix length k (`prefix_curves`,
`recall_vs_chance`), what each token knows (`information_map`, `order_by_token`, `leakage`), where registers
look (`attention_maps`), embeddings in 2-D (`embedding_views`), nearest neighbours at k (`neighbours`, the
k slider's figure) and how much of each stage a factor moves (`factor_stages`)."""
from __future__ import annotations

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from plots import (CHANCE_STYLE, GROUP_COLORS, MODALITY_MARKERS, WIDTH, color_factor_labels, image_array, panel_grid,
                   show_content, spare_legend, wrapped)
from synthtouch import SynthTouch


def prefix_curves(tables: dict, metrics: list[str], title: str, chance: dict[str, str] | None = None) -> Figure:
    """One panel per metric, one line per table (label → table from evaluate.evaluate_prefixes), k on
    a log2 axis. A one-row table (the adapter: one token) is a marker at k = 1 with a dashed level line,
    so register prefixes can be compared with it. `chance`: metric → chance column, drawn dotted."""
    fig, axes, spare = panel_grid(len(metrics), 2, 3.1)
    all_ks = sorted({int(k) for t in tables.values() for k in t.index})
    for ax, metric in zip(axes, metrics):
        for i, (label, table) in enumerate(tables.items()):
            if metric not in table:
                continue
            ks, values = np.asarray(table.index, dtype=float), table[metric].to_numpy()
            if len(ks) == 1:
                ax.axhline(values[0], color=f"C{i}", linestyle="--", linewidth=1)
                ax.plot(ks, values, marker="D", color=f"C{i}", linestyle="none", label=f"{label} (1 token)")
            else:
                ax.plot(ks, values, marker="o", color=f"C{i}", label=label)
        if chance and metric in chance:
            level = next(t[chance[metric]].iloc[0] for t in tables.values() if chance[metric] in t)
            ax.axhline(level, label="chance", **CHANCE_STYLE)
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_ks, [str(k) for k in all_ks])
        ax.set_xlabel("prefix length k (tokens, log2 scale)")
        ax.set_ylabel("mean cosine similarity" if "cos" in metric else
                      "probe score (0 = chance, 1 = perfect)" if "[" in metric else "recall (fraction of queries)")
        ax.set_title(wrapped(metric, 40), fontsize=10)
        ax.grid(alpha=0.3)
    handles = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}  # each run once
    spare_legend(fig, handles.values(), handles.keys(), spare, fontsize=8)
    fig.suptitle(wrapped(title, 80))
    return fig


def information_map(info, n_shared: int, title: str = "Information map: linear probes per token") -> Figure:
    """Heatmap per modality, tokens (first to last, then the shared and private groups) × factors
    (grouped by who sees them, labels in their group colour); cell = probe score above chance,
    (score − chance)/(1 − chance), so 0 is chance and 1 is perfect for accuracies and R² alike. A score at or
    below chance is drawn as "none" (light grey), never as a negative number."""
    modalities = list(dict.fromkeys(info.modality))
    factors = list(dict.fromkeys(info.sort_values("group", key=lambda g: g.map(list(GROUP_COLORS).index),
                                                  kind="stable").factor))
    groups = dict(zip(info.factor, info.group))
    fig, axes, _ = panel_grid(len(modalities), 1, 0.26 * len(factors) + 1.3)
    for ax, m in zip(axes, modalities):
        part = info[info.modality == m]
        sources = list(dict.fromkeys(part.source))
        grid = part.pivot(index="factor", columns="source", values="above chance").loc[factors, sources]
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.88")
        image = ax.imshow(np.ma.masked_less_equal(grid.to_numpy(), 0), vmin=0, vmax=1, cmap=cmap, aspect="auto")
        ax.set_xticks(range(len(sources)), [s.replace("token ", "") for s in sources], rotation=90, fontsize=8)
        ax.set_yticks(range(len(factors)), factors)
        color_factor_labels(ax.get_yticklabels(), groups)
        n_tokens = sum(s.startswith("token") for s in sources)
        ax.axvline(min(n_shared, n_tokens) - 0.5, color="white", linewidth=2)  # shared | private tokens
        ax.axvline(n_tokens - 0.5, color="black", linewidth=2)  # single tokens | token groups
        ax.set_xlabel("register token index (then token groups)")
        ax.set_title(f"{m} tokens", color=GROUP_COLORS.get(m, "black"))
        ax.set_ylabel("factor (colour = who sees it)")
    fig.colorbar(image, ax=axes, label="probe score above chance\n(1 = perfect; grey: none)")
    fig.suptitle(title)
    return fig


def order_by_token(table, title: str = "What each single token knows, coarse and fine") -> Figure:
    """One panel per modality: evaluate.order_by_token's mean probe score above chance of each kind of
    factor, against the token index; solid for coarse factors, dashed for fine ones, in the group colour."""
    modalities = list(dict.fromkeys(table.index.get_level_values("modality")))
    fig, axes, spare = panel_grid(len(modalities), 2, 3.2, sharey=True)
    for ax, m in zip(axes, modalities):
        for kind, row in table.loc[m].iterrows():
            owner, scale = kind.split(" · ")
            color = GROUP_COLORS["shared"] if owner == "shared" else GROUP_COLORS[m] if owner == "own private" else "0.6"
            ax.plot(row.index, row.to_numpy(), marker="o", markersize=3, color=color,
                    linestyle="-" if scale == "coarse" else "--", label=kind)
        ax.set_xlabel("register token index")
        ax.set_title(f"{m} tokens", color=GROUP_COLORS.get(m, "black"))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean probe score above chance")
    handles = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}
    spare_legend(fig, handles.values(), handles.keys(), spare, fontsize=8)
    fig.suptitle(title)
    return fig


def leakage(table, title: str = "Private factors: decoded from which tokens?") -> Figure:
    """Bars per private factor: the own modality's private and shared tokens (leakage) and the other
    modality's shared tokens (a sanity control), with the chance level as a black tick."""
    columns = [c for c in ("own private", "own shared", "other shared (control)") if c in table.columns]
    fig = Figure(figsize=(WIDTH, 4.4), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(columns)
    x = np.arange(len(table))
    for j, column in enumerate(columns):
        colors = [GROUP_COLORS[g] if column == "own private" else GROUP_COLORS["shared"] for g in table.group]
        alpha = {0: 1.0, 1: 0.75}.get(j, 0.35)
        ax.bar(x + (j - (len(columns) - 1) / 2) * width, table[column], width, color=colors, alpha=alpha,
               label=column, edgecolor="black", linewidth=0.4)
    ax.scatter(x, table.chance, marker="_", s=900, color="black", zorder=3, label="chance (majority class)")
    ax.set_xticks(x, table.factor)
    color_factor_labels(ax.get_xticklabels(), dict(zip(table.factor, table.group)))
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("private factor (colour = the modality that sees it)")
    ax.set_ylabel("probe score on test (accuracy, or R²)")
    fig.legend(*ax.get_legend_handles_labels(), fontsize=8, loc="outside lower center", ncols=2, markerscale=0.3)
    fig.suptitle(title)
    return fig


def attention_maps(rows: dict, n_show: int = 8, title: str = "Where each register looks") -> Figure:
    """rows: label → (image 3×H×W, maps R×h×w). Each row: the image, then up to `n_show` registers
    from the first to the last, their attention over the patches drawn on the image."""
    n_cols = 1 + min(n_show, max(len(maps) for _, maps in rows.values()))
    fig = Figure(figsize=(WIDTH, (WIDTH / n_cols + 0.3) * len(rows) + 0.7), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(rows), n_cols))
    for row, (label, (image, maps)) in zip(axes, rows.items()):
        picked = np.unique(np.linspace(0, len(maps) - 1, min(n_show, len(maps))).round().astype(int))
        show_content(row[0], image)
        row[0].set_ylabel(wrapped(label, 16), fontsize=8)
        row[0].set_title("image", fontsize=8)
        height, width = image_array(image).shape[:2]
        for ax, r in zip(row[1:], picked):
            show_content(ax, image)
            heat = maps[r] / maps[r].max()
            ax.imshow(heat, cmap="magma", alpha=0.6, extent=(-0.5, width - 0.5, height - 0.5, -0.5),
                      interpolation="nearest")
            ax.set_title(f"reg. {r}", fontsize=8)
        for ax in row[1 + len(picked):]:
            ax.axis("off")
    fig.suptitle(f"{title}\n(attention over image patches, last block, bright = more weight)", fontsize=10)
    return fig


def embedding_views(points: dict, factors: dict, names: list[str], value_names: dict,
                    title: str = "Shared embeddings of both modalities (PCA)") -> Figure:
    """points: modality → N×2. One panel per factor name, points coloured by that factor's value,
    marker = modality. Aligned modalities overlap; a shared factor should form clusters, a private one not."""
    fig, axes, _ = panel_grid(len(names), 2, 3.6)
    for ax, name in zip(axes, names):
        cmap = matplotlib.colormaps["tab10"]
        codes = np.asarray(factors[name])
        for m, xy in points.items():
            ax.scatter(xy[:, 0], xy[:, 1], c=cmap(codes % 10), marker=MODALITY_MARKERS[m], s=10, alpha=0.6,
                       linewidths=0)
        handles = [Line2D([], [], marker="o", linestyle="none", color=cmap(i), label=v)
                   for i, v in enumerate(value_names[name])]
        handles += [Line2D([], [], marker=MODALITY_MARKERS[m], linestyle="none", color="0.3", label=m) for m in points]
        ax.legend(handles=handles, fontsize=7, loc="best")
        group = SynthTouch.factor_groups[name]
        ax.set_title(f"coloured by {name} ({group} factor)", color=GROUP_COLORS[group], fontsize=10)
        ax.set_xlabel("PC 1 (unitless)")
        ax.set_ylabel("PC 2 (unitless)")
    fig.suptitle(title)
    return fig


def neighbours(panels: list[dict]) -> Figure:
    """Rows from widgets.NeighbourViewer.panel: the query, then its nearest neighbours of the other
    modality, each with its factors (in their group colours). Frame: green = the query's own pair,
    blue = same shared factors, red = different."""
    n_cols = 1 + max(len(p["neighbours"]) for p in panels)
    n_lines = max(len(cell["lines"]) for p in panels for cell in [p["query"], *p["neighbours"]])
    cell = WIDTH / n_cols
    fig = Figure(figsize=(WIDTH, (cell + 0.35 + 0.16 * n_lines) * len(panels) + 0.6), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(panels), n_cols))
    for row, panel in zip(axes, panels):
        cells = [(panel["query"], "query", "black")] + [
            (n, f"#{i + 1}", "green" if n["pair"] else "tab:blue" if n["factor_match"] else "red")
            for i, n in enumerate(panel["neighbours"])]
        for ax, (cell, name, frame) in zip(row, cells):
            show_content(ax, cell["content"])
            for spine in ax.spines.values():
                spine.set(color=frame, linewidth=3)
            ax.set_title(name, fontsize=8)
            for line, (text, group) in enumerate(cell["lines"]):
                ax.text(0.5, -0.04 - 0.13 * line, text, transform=ax.transAxes, ha="center", va="top", fontsize=7,
                        color=GROUP_COLORS[group])
        row[0].set_ylabel(panel["title"].split(":")[0], fontsize=10)
    what = panels[0]["title"].split(": ", 1)[-1]
    fig.suptitle(f"Nearest neighbours, {what}\n(frame: green = own pair, blue = same shared factors, red = different)",
                 fontsize=10)
    return fig


def recall_vs_chance(bars: dict[str, tuple[float, float]],
                     title: str = "Caption-level retrieval at k = n_shared, test split") -> Figure:
    """One bar per {label: (recall, chance)}: a recall with the chance level it must beat marked on it."""
    fig = Figure(figsize=(1.8 * len(bars) + 2.4, 3.2), layout="constrained")
    ax = fig.subplots()
    ax.bar(range(len(bars)), [v for v, _ in bars.values()], color="tab:blue", label="R@1")
    ax.scatter(range(len(bars)), [c for _, c in bars.values()], color="black", marker="_", s=600, label="chance")
    ax.set_xticks(range(len(bars)), list(bars))
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title(title)
    return fig


STAGE_STYLES = {"frozen tokens": dict(alpha=0.35), "shared embedding": dict(alpha=1.0),
                "private tokens": dict(alpha=0.65, hatch="//")}


def factor_stages(shares, title: str = "How loud each factor is at each stage: one factor redrawn at a time") -> Figure:
    """audit.variance_shares of a run's stages, one panel per modality: per factor a bar for each stage, the share
    of that stage's variance that moves with the factor alone (factor labels in their group colour, the sensors'
    noise last). A private factor's bar at the shared embedding is how loud its leak is."""
    order = [*SynthTouch.factor_groups, *sorted(set(shares.factor) - set(SynthTouch.factor_groups))]
    order = [f for f in order if f in set(shares.factor)]
    stages = [s for s in STAGE_STYLES if s in set(shares.stage)]
    fig = Figure(figsize=(WIDTH, 0.26 * len(order) + 2.2), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    y, height = np.arange(len(order)), 0.8 / len(stages)
    for ax, modality in zip(axes, ("vision", "touch")):
        part = shares[shares.modality == modality]
        for j, stage in enumerate(stages):
            values = part[part.stage == stage].set_index("factor").share.reindex(order)
            ax.barh(y + (j - (len(stages) - 1) / 2) * height, values, height, color=GROUP_COLORS[modality],
                    edgecolor="black", linewidth=0.3, label=stage, **STAGE_STYLES[stage])
        ax.set_title(modality)
        ax.set_xlabel("share of the stage's variance\nthe factor moves alone")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, order)
    color_factor_labels(axes[0].get_yticklabels(), SynthTouch.factor_groups)
    axes[0].invert_yaxis()
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=8, loc="outside lower center", ncols=len(stages))
    fig.suptitle(wrapped(title, 70), fontsize=11)
    return fig
