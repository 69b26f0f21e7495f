"""Every figure of the workbook. Each function takes tables or arrays and returns a matplotlib Figure
(built without pyplot, so nothing is shown twice or left open); notebooks save it with
workbook.save_figure. Colours: one per factor group, the same in every figure (GROUP_COLORS); the
vision and touch colours also stand for those modalities.

Importing this module inside IPython makes every Figure display as a PNG image (see `show_figures_as_png`).
"""
from __future__ import annotations

import io
import math
import struct
import textwrap
import zlib

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.text import Text
from matplotlib.ticker import MaxNLocator

from synthtouch import SynthTouch

GROUP_COLORS = {"shared": "#6a3d9a", "vision": "#e66101", "touch": "#1b7f79"}
MODALITY_MARKERS = {"vision": "o", "touch": "^", "text": "s"}
CHANCE_STYLE = dict(color="0.45", linestyle=":", linewidth=1.2)
DPI = 110
# JupyterLab shows an output image at its own size, scaled down to the output area's width when it is wider. With
# the file browser open in a 1280 px wide window the area is 840 px wide at 100 % zoom (1000 px at 1440; measured in
# Chromium: the area's width less its padding). Figures are drawn WIDTH inches wide, so that with savefig's tight
# padding they fit 840 px unscaled, and panels that do not fit side by side wrap into rows: no text is then smaller
# than MIN_TEXT_PX on screen (tests/test_plots.py measures every figure with `smallest_text_px`).
NOTEBOOK_PX, MIN_TEXT_PX = 840, 9
SMALLEST_TEXT = "smallest text px"  # the PNG text chunk in which png() writes its figure's smallest text height
WIDTH = 7.4


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes: what notebooks display, the k slider shows and workbook.save_figure writes. The PNG
    says the height of its smallest text in its own pixels (SMALLEST_TEXT), so a browser can measure it on screen
    (tests/test_browser.py)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    # measured once drawn: tick labels exist only then. A tEXt chunk (key, NUL, value) right after the header chunk
    text = f"{SMALLEST_TEXT}\0{_smallest_font_px(fig):.2f}".encode("latin-1")
    chunk = struct.pack(">I", len(text)) + b"tEXt" + text + struct.pack(">I", zlib.crc32(b"tEXt" + text))
    data = buffer.getvalue()
    return data[:33] + chunk + data[33:]  # after the 8 bytes of signature and the 25 of the header chunk


def significant(x, digits: int = 3) -> str:
    """A number as the workbook's tables show it: `digits` significant digits and no exponent; below half a unit
    of the `digits`-th decimal it is 0 (a BLEU of 5e-18 is no BLEU); a missing one is "–"."""
    if x is None or not np.isfinite(x):
        return "–"
    if abs(x) < 0.5 * 10.0 ** -digits:
        return "0"
    if abs(x) >= 10 ** digits:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def _smallest_font_px(fig: Figure) -> float:
    """The height in the PNG's pixels of the smallest text `fig` shows: its font size in points at DPI."""
    shown = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()
             and (t.axes is None or t.axes.get_visible())]
    return min((t.get_fontsize() for t in shown), default=math.inf) * DPI / 72


def smallest_text_px(fig: Figure, width_px: int = NOTEBOOK_PX) -> float:
    """The on-screen height (px) of the smallest text of `fig` shown in an output area `width_px` wide at 100 %
    zoom: its height in the PNG, times the scale JupyterLab shrinks the PNG by when it is wider."""
    image_width = struct.unpack(">I", png(fig)[16:20])[0]  # the PNG header's width, after the tight crop
    return _smallest_font_px(fig) * min(1.0, width_px / image_width)


def _grid(n: int, columns: int, panel_height: float, **kwargs) -> tuple[Figure, np.ndarray, np.ndarray]:
    """A figure WIDTH wide with n panels in rows of `columns` (fewer when n is smaller): the panels, and the
    empty slots left in the last row (hidden; a legend may go there)."""
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    fig = Figure(figsize=(WIDTH, panel_height * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False, **kwargs).ravel()
    for ax in axes[n:]:
        ax.axis("off")
    return fig, axes[:n], axes[n:]


def _legend(fig: Figure, handles, labels, spare, **kwargs):
    """A legend in an empty slot of the grid when there is one, else under the panels, never over data."""
    if len(spare):
        return spare[0].legend(handles, labels, loc="center", **kwargs)
    return fig.legend(handles, labels, loc="outside lower center", ncols=2, **kwargs)


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(text, width))


def show_figures_as_png():
    """Without pyplot no inline backend is active, and IPython shows a Figure as the text `<Figure size ...>`.
    Registering a PNG formatter for Figure makes `fig` (or `display(fig)`) an `image/png` output, which
    JupyterLab, VS Code and executed notebooks (nbclient) all render. A cell that imports pyplot, or calls
    ipywidgets.interact, replaces it with matplotlib_inline's formatter (other size, no SMALLEST_TEXT), so it is
    registered again after every cell: from the next cell on, figures are plots.png's again. Outside IPython this
    does nothing."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None:
        _register_png()
        shell.events.register("post_execute", _register_png)  # once: the same function is registered once


def _register_png():
    from IPython import get_ipython
    get_ipython().display_formatter.formatters["image/png"].for_type(Figure, png)


show_figures_as_png()


def _image(content) -> np.ndarray:
    """A 3×H×W tensor/array in [0, 1] as H×W×3 for imshow."""
    array = content.detach().cpu().numpy() if hasattr(content, "detach") else np.asarray(content)
    return np.clip(array.transpose(1, 2, 0), 0, 1)


def _show(ax, content):
    """An image, or a caption (the text modality) written into the axes."""
    if isinstance(content, str):
        ax.text(0.5, 0.5, content.replace(", ", ",\n"), ha="center", va="center", fontsize=7)
    else:
        ax.imshow(_image(content))
    ax.set_xticks([])
    ax.set_yticks([])


def _color_factor_labels(labels, groups: dict[str, str]):
    """Each label in its factor's group colour (grey for a row that is no factor, such as the sensors' noise)."""
    for label in labels:
        label.set_color(GROUP_COLORS.get(groups.get(label.get_text()), "0.45"))


def _color_labels(labels, colors):
    for label, color in zip(labels, colors):
        label.set_color(color)


def _group_legend(target, groups, **kwargs):
    """A legend of the factor groups present, in their colours, on an Axes or (outside the panels) a Figure."""
    present = [g for g in GROUP_COLORS if g in set(groups)]
    target.legend(handles=[Patch(color=GROUP_COLORS[g], label=f"{g} factor" if g == "shared" else f"{g}-only factor")
                       for g in present], fontsize=8, **kwargs)


# ----------------------------------------------------------------------------------------------
# Coarse to fine: quality vs k

def prefix_curves(tables: dict, metrics: list[str], title: str, chance: dict[str, str] | None = None) -> Figure:
    """One panel per metric, one line per table (label → table from evaluate.evaluate_prefixes), k on
    a log2 axis. A one-row table (the adapter: one token) is a marker at k = 1 with a dashed level line,
    so register prefixes can be compared with it. `chance`: metric → chance column, drawn dotted."""
    fig, axes, spare = _grid(len(metrics), 2, 3.1)
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
        ax.set_title(_wrap(metric, 40), fontsize=10)
        ax.grid(alpha=0.3)
    handles = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}  # each run once
    _legend(fig, handles.values(), handles.keys(), spare, fontsize=8)
    fig.suptitle(_wrap(title, 80))
    return fig


# ----------------------------------------------------------------------------------------------
# What each token knows

def information_map(info, n_shared: int, title: str = "Information map: linear probes per token") -> Figure:
    """Heatmap per modality, tokens (first to last, then the shared and private groups) × factors
    (grouped by who sees them, labels in their group colour); cell = probe score above chance,
    (score − chance)/(1 − chance), so 0 is chance and 1 is perfect for accuracies and R² alike. A score at or
    below chance is drawn as "none" (light grey), never as a negative number."""
    modalities = list(dict.fromkeys(info.modality))
    factors = list(dict.fromkeys(info.sort_values("group", key=lambda g: g.map(list(GROUP_COLORS).index),
                                                  kind="stable").factor))
    groups = dict(zip(info.factor, info.group))
    fig, axes, _ = _grid(len(modalities), 1, 0.26 * len(factors) + 1.3)
    for ax, m in zip(axes, modalities):
        part = info[info.modality == m]
        sources = list(dict.fromkeys(part.source))
        grid = part.pivot(index="factor", columns="source", values="above chance").loc[factors, sources]
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.88")
        image = ax.imshow(np.ma.masked_less_equal(grid.to_numpy(), 0), vmin=0, vmax=1, cmap=cmap, aspect="auto")
        ax.set_xticks(range(len(sources)), [s.replace("token ", "") for s in sources], rotation=90, fontsize=8)
        ax.set_yticks(range(len(factors)), factors)
        _color_factor_labels(ax.get_yticklabels(), groups)
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
    fig, axes, spare = _grid(len(modalities), 2, 3.2, sharey=True)
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
    _legend(fig, handles.values(), handles.keys(), spare, fontsize=8)
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
    _color_factor_labels(ax.get_xticklabels(), dict(zip(table.factor, table.group)))
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
        _show(row[0], image)
        row[0].set_ylabel(_wrap(label, 16), fontsize=8)
        row[0].set_title("image", fontsize=8)
        height, width = _image(image).shape[:2]
        for ax, r in zip(row[1:], picked):
            _show(ax, image)
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
    fig, axes, _ = _grid(len(names), 2, 3.6)
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
            _show(ax, cell["content"])
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


# ----------------------------------------------------------------------------------------------
# The testbed (notebook 01)

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
        _show(vision, sample["vision"])
        _show(touch, sample["touch"])
        for line, name in enumerate(SynthTouch.FACTORS):
            adjective = SynthTouch.ADJECTIVES[name][sample["factors"][name]]
            touch.text(0.5, -0.06 - 0.1 * line, adjective, transform=touch.transAxes, ha="center", va="top",
                       fontsize=8, color=GROUP_COLORS[SynthTouch.factor_groups[name]])
        if col == 0:
            vision.set_ylabel("vision")
            touch.set_ylabel("touch")
    _group_legend(fig, SynthTouch.factor_groups.values(), loc="outside lower center", ncols=len(GROUP_COLORS))
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
                _show(ax, sample[modality])
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
    _color_factor_labels(ax.get_yticklabels(), factor_groups)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    _group_legend(ax, factor_groups.values(), loc="upper left", bbox_to_anchor=(1.02, 1))
    ax.set_title(title)
    return fig


# ----------------------------------------------------------------------------------------------
# Phase-1 training (notebook 02)

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
    _color_factor_labels(shares.get_yticklabels(), groups)
    shares.invert_yaxis()
    shares.set_xlabel("share of the frozen tokens'\nvariance it moves")
    scores.set_xlabel("linear probe score above chance\n(R² or accuracy; ≤ 0 drawn at 0)")
    scores.set_xlim(-0.02, 1.02)
    for ax in (shares, scores):
        ax.grid(axis="x", alpha=0.3)
    shares.legend(fontsize=8, loc="lower right")
    fig.legend(*scores.get_legend_handles_labels(), fontsize=8, loc="outside lower center", ncols=2)
    fig.suptitle(_wrap(title, 70), fontsize=11)
    return fig


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
    fig, axes, _ = _grid(len(columns), len(columns), 0.19 * len(order) + 1.0, sharey=True)
    y = np.arange(len(order))
    for ax, column in zip(axes, columns):
        for i, name in enumerate(order):
            row = table.loc[name]
            ax.errorbar(row[column], i, xerr=row.get(f"{column} std"), fmt="o", ms=4, capsize=2,
                        color=colors[family(name)])
        for edge in np.flatnonzero([family(a) != family(b) for a, b in zip(order, order[1:])]):
            ax.axhline(edge + 0.5, color="0.8", linewidth=0.8)  # between families
        ax.set_title(_wrap(column, 18), fontsize=8)
        # a panel is about an inch wide: two or three ticks, or labels such as "0.25" run into each other
        ax.xaxis.set_major_locator(MaxNLocator(nbins=2))
        ax.grid(axis="x", alpha=0.3)
    reference = table.get("source", pd.Series(dtype=str)).reindex(order).eq("reference")
    axes[0].set_yticks(y, [f"{name} *" if ref else name for name, ref in zip(order, reference)], fontsize=7)
    axes[0].invert_yaxis()
    _color_labels(axes[0].get_yticklabels(), [colors[family(name)] for name in order])
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
        ax.set(xlabel=f"{factor} of the top-1 touch item", title=_wrap(run, 40))
        ax.title.set_fontsize(9)
    axes[1].set_ylabel(f"{factor} of the vision query")
    fig.suptitle(title)
    return fig


# ----------------------------------------------------------------------------------------------
# Phase 2: captions from token prefixes (notebook 04)

def _caption_lines(ax, caption: str, factors: dict, y: float, label: str):
    """`label: caption` under an axes, each adjective in its group colour, grey and struck when wrong."""
    parsed = SynthTouch.parse_caption(caption)
    wrong = sum(parsed[name] != factors[name] for name in SynthTouch.FACTORS)
    ax.text(0.0, y, f"{label} ({len(SynthTouch.FACTORS) - wrong}/{len(SynthTouch.FACTORS)} right): {caption}",
            transform=ax.transAxes, ha="left", va="top", fontsize=8,
            color="black" if not wrong else "firebrick")


def caption_gallery(samples: list[dict], title: str = "Test samples and their generated captions") -> Figure:
    """samples: {vision, touch, factors, caption, generated}. One row each: the two images, then the true
    caption and the generated one with how many attributes it names right (red when any is wrong)."""
    fig = Figure(figsize=(WIDTH, 1.25 * len(samples) + 0.5), layout="constrained")
    axes = fig.subplots(len(samples), 3, squeeze=False, width_ratios=[1, 1, 5])
    for row, sample in zip(axes, samples):
        _show(row[0], sample["vision"])
        _show(row[1], sample["touch"])
        row[2].axis("off")
        row[2].text(0.0, 0.75, f"true:  {sample['caption']}", transform=row[2].transAxes, ha="left", va="top",
                    fontsize=8)
        _caption_lines(row[2], sample["generated"], sample["factors"], 0.4, "generated")
    axes[0, 0].set_title("vision", fontsize=9)
    axes[0, 1].set_title("touch", fontsize=9)
    fig.suptitle(title)
    return fig


def captions_by_k(sample: dict, captions: dict, title: str = "One sample, captioned from the first k tokens") -> Figure:
    """The static version of the k slider: a sample's images and its caption for every k (0 = no prefix)."""
    fig = Figure(figsize=(WIDTH, 0.32 * len(captions) + 1.6), layout="constrained")
    axes = fig.subplots(1, 3, width_ratios=[1, 1, 5])
    _show(axes[0], sample["vision"])
    _show(axes[1], sample["touch"])
    axes[0].set_title("vision", fontsize=9)
    axes[1].set_title("touch", fontsize=9)
    axes[2].axis("off")
    axes[2].text(0.0, 1.0, f"true:  {sample['caption']}", transform=axes[2].transAxes, ha="left", va="top", fontsize=8,
                 fontweight="bold")
    for i, (k, caption) in enumerate(captions.items()):
        _caption_lines(axes[2], caption, sample["factors"], 0.88 - 0.8 * i / max(len(captions) - 1, 1), f"k={k}")
    fig.suptitle(title)
    return fig


def caption_accuracy_vs_k(table, baseline: dict, title: str = "Caption attributes vs prefix length") -> Figure:
    """table: one row per k (0 = no prefix) with columns `accuracy <group>`; one line per factor group in
    its colour, and the group's majority baseline (always naming the most common value) dotted."""
    fig = Figure(figsize=(6.2, 3.8), layout="constrained")
    ax = fig.subplots()
    ks = list(table.index)
    x = np.arange(len(ks))
    for group, color in GROUP_COLORS.items():
        ax.plot(x, table[f"accuracy {group}"], marker="o", color=color,
                label=f"{group} factors" if group == "shared" else f"{group}-only factors")
        ax.axhline(baseline[f"accuracy {group}"], color=color, linestyle=":", linewidth=1.2)
    ax.plot(x, table["accuracy"], marker="s", color="black", linewidth=2, label="all factors")
    ax.axhline(baseline["accuracy"], label="majority baseline (dotted)", **CHANCE_STYLE)
    ax.set_xticks(x, ["0\n(none)" if k == 0 else str(k) for k in ks])
    ax.set_xlabel("tokens per modality given to the decoder (k)")
    ax.set_ylabel("attribute accuracy (fraction right)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title)
    return fig


def caption_sources(table, baseline: dict, title: str = "Which tokens the decoder sees") -> Figure:
    """table: one row per token source with columns `accuracy <group>`; bars per group in its colour,
    the group's majority baseline as a dotted mark. Vision tokens cannot know touch-only factors."""
    fig = Figure(figsize=(6.2, 3.8), layout="constrained")
    ax = fig.subplots()
    x, width = np.arange(len(table)), 0.8 / len(GROUP_COLORS)
    for i, (group, color) in enumerate(GROUP_COLORS.items()):
        offset = (i - (len(GROUP_COLORS) - 1) / 2) * width
        ax.bar(x + offset, table[f"accuracy {group}"], width, color=color,
               label=f"{group} factors" if group == "shared" else f"{group}-only factors")
        ax.hlines(np.full(len(x), baseline[f"accuracy {group}"]), x + offset - width / 2, x + offset + width / 2,
                  colors="black", linestyles=":", linewidth=1.5)
    ax.set_xticks(x, list(table.index))
    ax.set_xlabel("token source (all tokens of each modality named)")
    ax.set_ylabel("attribute accuracy (fraction right)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, loc="upper left", title="dotted: majority baseline", title_fontsize=7)
    ax.set_title(title)
    return fig


def caption_vs_probe(table, baseline: dict, groups: dict[str, str],
                     title: str = "Caption accuracy vs what the tokens hold") -> Figure:
    """table: one row per k (0 = no prefix) with `accuracy <attribute>` and `probe accuracy <attribute>` (the
    linear probe of the very tokens the decoder saw); groups: attribute → who sees it. One panel per
    group and per attribute, in group colour: the caption (solid), the probe (dashed), the gap shaded, the
    majority baseline dotted."""
    panels = [(f"all {g}" if g == "shared" else f"all {g}-only", f"accuracy {g}", g) for g in GROUP_COLORS]
    panels += [(name, f"accuracy {name}", group) for name, group in groups.items()]
    fig, axes, spare = _grid(len(panels), 3, 2.0, sharex=True, sharey=True)
    ks = list(table.index)
    x = np.arange(len(ks))
    for ax, (label, column, group) in zip(axes, panels):
        color = GROUP_COLORS[group]
        ax.plot(x, table[column], marker="o", color=color, label="caption")
        ax.plot(x, table[f"probe {column}"], marker="o", markerfacecolor="white", linestyle="--", color=color,
                label="linear probe of the same tokens")
        ax.fill_between(x, table[column], table[f"probe {column}"], color=color, alpha=0.15)
        ax.axhline(baseline[column], label="majority baseline", **CHANCE_STYLE)
        ax.set_title(label, color=color, fontsize=10)
        ax.set_xticks(x, [str(k) for k in ks])
        ax.tick_params(labelbottom=True)  # every panel's k: the last row may not be full
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    _legend(fig, *axes[0].get_legend_handles_labels(), spare, fontsize=8)
    fig.supxlabel("tokens per modality given to the decoder (k; 0 = none)")
    fig.supylabel("attribute accuracy (fraction right)")
    fig.suptitle(title)
    return fig


def caption_ablation(table, title: str = "Phase-2 settings on the validation split, vision + touch tokens") -> Figure:
    """table: one row per (setting, k) with `accuracy <group>`, `probe accuracy <group>` and `majority accuracy
    <group>`, all settings captioning the same phase-1 tokens. One panel per factor group: each setting's caption
    accuracy against k (solid), the linear probe of those tokens (dashed, black), the majority baseline."""
    fig = Figure(figsize=(WIDTH, 4.6), layout="constrained")
    axes = fig.subplots(1, len(GROUP_COLORS), sharey=True)
    settings = list(dict.fromkeys(table.setting))
    colors = matplotlib.colormaps["viridis"](np.linspace(0, 0.9, len(settings)))
    for ax, group in zip(axes, GROUP_COLORS):
        column = f"accuracy {group}"
        for setting, color in zip(settings, colors):
            rows = table[table.setting == setting].sort_values("k")
            x = np.arange(len(rows))
            ax.plot(x, rows[column], marker="o", color=color, label=setting)
        ax.plot(x, rows[f"probe {column}"], linestyle="--", color="black", label="linear probe of the same tokens")
        ax.axhline(rows[f"majority {column}"].iloc[0], label="majority baseline", **CHANCE_STYLE)
        ax.set_xticks(x, [str(k) for k in rows.k])
        ax.set_title("shared attributes" if group == "shared" else f"{group}-only\nattributes",
                     color=GROUP_COLORS[group], fontsize=10)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("attribute accuracy (fraction right)")
    fig.supxlabel("tokens per modality given to the decoder (k)")
    fig.legend(*axes[-1].get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=8)
    fig.suptitle(_wrap(title, 70), fontsize=11)
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
