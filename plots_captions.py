"""The figures of phase 2, captions from token prefixes (notebook 04): generated captions with each adjective
right or wrong (`caption_gallery`, `captions_by_k`), attribute accuracy vs k (`caption_accuracy_vs_k`), per
token source (`caption_sources`), against the probe ceiling of the same tokens (`caption_vs_probe`), and the
phase-2 settings compared (`caption_ablation`)."""
from __future__ import annotations

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from plots import CHANCE_STYLE, GROUP_COLORS, WIDTH, panel_grid, show_content, spare_legend, wrapped
from synthtouch import SynthTouch


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
        show_content(row[0], sample["vision"])
        show_content(row[1], sample["touch"])
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
    show_content(axes[0], sample["vision"])
    show_content(axes[1], sample["touch"])
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
    fig, axes, spare = panel_grid(len(panels), 3, 2.0, sharex=True, sharey=True)
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
    spare_legend(fig, *axes[0].get_legend_handles_labels(), spare, fontsize=8)
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
    fig.suptitle(wrapped(title, 70), fontsize=11)
    return fig
