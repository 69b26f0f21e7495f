"""Every figure of the plots_*.py modules is readable at a notebook's width: drawn from the reference runs' own tables
(the shapes a notebook draws), shown in an output area plots.NOTEBOOK_PX wide, its smallest text is at least
plots.MIN_TEXT_PX tall on screen, and no legend lies over another panel."""
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import evaluate
import information
import llm_integration
import plots
import plots_captions
import plots_prefix
import plots_testbed
import plots_training
import retrieval
import study
import train
from data import SynthTouch
from widgets import NeighbourViewer

pytestmark = pytest.mark.usefixtures("one_thread")


def reference(variant: str):
    return study.finished_run(variant, 0, "nothing trained here")


def samples(n: int) -> list[dict]:
    dataset = SynthTouch(n, seed=0, image_size=64, split="test")
    return [{**dataset[i], "generated": dataset[(i + 1) % n]["caption"]} for i in range(n)]


def ablation() -> pd.DataFrame:
    table = pd.read_csv(llm_integration.VALIDATION_REFERENCE)
    return table[table.modalities == "vision+touch"]


def vs_k() -> tuple[pd.DataFrame, dict]:
    """Notebook 04's accuracy-vs-k table and majority baseline, from one setting of the phase-2 reference."""
    rows = ablation()
    rows = rows[rows.setting == rows.setting.iloc[0]].set_index("k")
    majority = {c[len("majority "):]: rows[c].iloc[0] for c in rows if c.startswith("majority ")}
    return rows, majority


def audit_table() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame([{"factor": f, "group": g, "scale": SynthTouch.SCALE[f], "modality": m,
                          "variance share": rng.random() / 4, "pixels": rng.random(), "frozen tokens": rng.random()}
                         for f, g in SynthTouch.factor_groups.items() for m in ("vision", "touch")])


def neighbour_panels(ks=(1, 2, 4)) -> list[dict]:
    items = samples(6)
    cell = lambda item, m: dict(content=item[m], lines=NeighbourViewer.describe(item))  # noqa: E731
    return [dict(title=f"k = {k}: vision query 0 → top-5 touch", query=cell(items[0], "vision"),
                 neighbours=[{**cell(item, "touch"), "pair": i == 0, "factor_match": i % 2 == 0}
                             for i, item in enumerate(items[:5])]) for k in ks]


def prefix_tables(variants) -> dict:
    return {v: evaluate.read_eval(reference(v) / "eval.json") for v in variants}


GUARDS = ("default", *study.LEAKAGE_VARIANTS)
RETRIEVAL = ["vision->touch R@1 pair", "vision->touch R@1 factor", "touch->vision R@1 pair"]
CHANCE = {"vision->touch R@1 pair": "chance@1 pair", "vision->touch R@1 factor": "chance@1 factor",
          "touch->vision R@1 pair": "chance@1 pair"}
LEAK = [f"{m} {measure} [non-linear]" for measure in ("leak into shared embedding (max)",
                                                      "shared factors from shared embedding (mean)")
        for m in ("vision", "touch")]
VARIATIONS = [("color", "blue"), ("lighting", "dim"), ("hardness", "soft"), ("pressure", "light"), ("texture", "dots"),
              ("orientation", "vertical"), *{name: (0.9,) * side ** 2 for name, side in SynthTouch.DETAILS.items()}.items()]


def base_factors() -> dict:
    base = {"texture": "stripes", "orientation": "diagonal", "roughness": "medium", "color": "red",
            "lighting": "bright", "hardness": "medium", "pressure": "firm"}
    return {**base, **{name: (0.0,) * side ** 2 for name, side in SynthTouch.DETAILS.items()}}


def confusion_figure():
    names = ["default", study.closest_to_target(study.tradeoff(study.read_rows("nothing trained here")))]
    confusions = {name: evaluate.read_confusion(reference(name)) for name in names}
    return plots_training.retrieval_failures({n: retrieval.top1_differs(t, 4) for n, t in confusions.items()},
                                             {n: retrieval.confusion_matrix(t, 4, "texture")
                                              for n, t in confusions.items()},
                                             "texture", {n: 0.9 for n in names})


def design_table() -> pd.DataFrame:
    tables = prefix_tables([f"{d} design" for d in ("flextok", "fluxtalk", "adapter")])
    return pd.DataFrame({name: table.iloc[-1].filter(regex="R@1 .*->|->.*R@1") for name, table in tables.items()}).T


FIGURES = {
    "sample grid": lambda: plots_testbed.sample_grid(samples(8)),
    "who sees what": lambda: plots_testbed.factor_visibility(SynthTouch.factor_groups),
    "render variations": lambda: plots_testbed.render_variations(SynthTouch(8, image_size=64), base_factors(),
                                                                 VARIATIONS),
    "testbed audit": lambda: plots_testbed.testbed_audit(audit_table(), 0.2, 0.5),
    "frozen features": lambda: plots_prefix.embedding_views(
        {"vision": np.random.default_rng(0).normal(size=(64, 2))},
        SynthTouch(64).factor_table(), ["roughness", "color"], dict(SynthTouch.FACTORS)),
    "loss curves": lambda: plots_training.loss_curves(train.read_metrics(reference("default")), "Phase-1 training"),
    "design lines": lambda: plots_training.design_comparison(design_table(), [c for c in design_table() if "R@1" in c]),
    "quality vs k, dropout": lambda: plots_prefix.prefix_curves(
        prefix_tables(["default", "uniform nested dropout", "linear nested dropout", "no nested dropout"]),
        RETRIEVAL + ["vision recon cos", "touch recon cos"], "Quality vs prefix length k, per nested-dropout mode",
        CHANCE),
    "quality vs k, designs": lambda: plots_prefix.prefix_curves(
        prefix_tables([f"{d} design" for d in ("flextok", "fluxtalk", "adapter")]), RETRIEVAL, "per design", CHANCE),
    "leakage vs k": lambda: plots_prefix.prefix_curves(prefix_tables(GUARDS), LEAK, "Own private factors in the shared "
                                                       "embedding vs k, per design (non-linear probes, test split)"),
    "trade-off": lambda: plots_training.tradeoff(study.tradeoff(study.read_rows("nothing trained here")), study.LEAK,
                                                 study.RETRIEVAL, 0.15, 0.9, study.family),
    "retrieval failures": confusion_figure,
    "study": lambda: plots_training.study_summary(study.per_variant(study.read_rows("nothing trained here")),
                                                  study.family),
    "information map": lambda: plots_prefix.information_map(evaluate.read_information(reference("default")),
                                                            n_shared=4),
    "order by token": lambda: plots_prefix.order_by_token(information.order_by_token(
        evaluate.read_information(reference("default")))),
    "leakage by token group": lambda: plots_prefix.leakage(information.leakage(
        evaluate.read_information(reference("default")))),
    "attention maps": lambda: plots_prefix.attention_maps(
        {f"{net} · {m}": (torch.rand(3, 64, 64), np.random.default_rng(0).random((16, 8, 8)))
         for net in ("joint (default)", "cross (fluxtalk)") for m in ("vision", "touch")}),
    "embeddings": lambda: plots_prefix.embedding_views(
        {m: np.random.default_rng(i).normal(size=(128, 2)) for i, m in enumerate(("vision", "touch"))},
        SynthTouch(128).factor_table(), ["texture", "color", "hardness"], dict(SynthTouch.FACTORS)),
    "neighbours": lambda: plots_prefix.neighbours(neighbour_panels()),
    "caption gallery": lambda: plots_captions.caption_gallery(samples(6)),
    "captions by k": lambda: plots_captions.captions_by_k(samples(1)[0], {k: samples(2)[1]["caption"]
                                                                         for k in (0, 1, 2, 4, 8, 16)}),
    "accuracy vs k": lambda: plots_captions.caption_accuracy_vs_k(*vs_k()),
    "caption vs probe": lambda: plots_captions.caption_vs_probe(*vs_k(), {f: g for f, g in
                                                                          SynthTouch.factor_groups.items()
                                                                          if f in SynthTouch.FACTORS}),
    "phase-2 settings": lambda: plots_captions.caption_ablation(ablation()),
    "token sources": lambda: plots_captions.caption_sources(vs_k()[0].iloc[[0, -1]].set_axis(["vision", "touch"]),
                                                            vs_k()[1]),
    "caption retrieval": lambda: plots_prefix.recall_vs_chance({"TVL vision→touch": (0.3, 0.1),
                                                                "digits vision→text": (0.8, 0.1)}),
}


@pytest.mark.parametrize("name", FIGURES)
def test_every_text_is_readable_at_the_notebook_width(name):
    fig = FIGURES[name]()
    assert plots.smallest_text_px(fig) >= plots.MIN_TEXT_PX, f"{name}: {plots.smallest_text_px(fig):.1f} px"


def drawn(fig):
    """The Agg renderer of `fig` once drawn: laid out as savefig lays it out, every text at its rendered place."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


@pytest.mark.parametrize("name", FIGURES)
def test_no_legend_lies_over_another_panel(name):
    fig = FIGURES[name]()
    renderer = drawn(fig)
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.axison]
    for legend in fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]:
        box = legend.get_window_extent(renderer)
        over = [ax.get_title() or ax.get_label() for ax in panels
                if ax is not legend.axes and ax.get_window_extent(renderer).overlaps(box)]
        assert not over, f"{name}: a legend covers {over}"


@pytest.mark.parametrize("name", FIGURES)
def test_no_tick_labels_run_into_each_other(name):
    """On a narrow panel too many ticks write "0.25 0.500.75": the rendered boxes of an axis's tick labels are
    apart."""
    fig = FIGURES[name]()
    renderer = drawn(fig)
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis) if ax.get_visible() and ax.axison else ():
            low, high = sorted(axis.get_view_interval())
            shown = [tick.label1 for tick, at in zip(axis.get_major_ticks(), axis.get_majorticklocs())
                     if low <= at <= high]  # a tick outside the view is not drawn
            labels = [t for t in shown if t.get_visible() and t.get_text().strip()]
            boxes = [t.get_window_extent(renderer) for t in labels]
            touching = [(labels[i].get_text(), labels[j].get_text()) for i in range(len(boxes))
                        for j in range(i + 1, len(boxes)) if boxes[i].overlaps(boxes[j])]
            assert not touching, f"{name}, {ax.get_title()!r}: tick labels {touching} overlap"


def test_a_figure_too_wide_for_the_notebook_is_measured_shrunk():
    """What the test measures: an 8 pt label is 12 px on screen in a figure that fits; one three times wider is
    shown at a third of its size."""
    from matplotlib.figure import Figure
    narrow, wide = (Figure(figsize=(width, 2), layout="constrained") for width in (plots.WIDTH, 3 * plots.WIDTH))
    for fig in (narrow, wide):
        fig.subplots().set_title("a title", fontsize=8)
        fig.axes[0].tick_params(labelsize=8)
    assert plots.smallest_text_px(narrow) == pytest.approx(8 * plots.DPI / 72)
    assert plots.smallest_text_px(wide) == pytest.approx(8 * plots.DPI / 72 / 3, rel=0.05)


def test_tables_show_three_significant_digits():
    assert [plots.significant(x) for x in (0.015625, 0.629189, 5.3e-18, 0.0, -0.0902, 12.345, 1234.5, float("nan"))] \
        == ["0.0156", "0.629", "0", "0", "-0.0902", "12.3", "1234", "–"]


def test_figures_stay_png_of_plots_after_a_cell_imports_pyplot():
    """Importing pyplot in a kernel (or ipywidgets.interact's first call) switches IPython to matplotlib_inline's
    formatter for Figure, which drops plots.png's size and text-size chunk; plots takes its place back once the cell
    is done. In a process of its own: pyplot's inline backend would stay in this test worker."""
    script = (
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "from matplotlib.figure import Figure\n"
        "shell = InteractiveShell.instance()\n"
        "shell.run_cell('import plots', store_history=False).raise_error()\n"
        "shell.run_cell('import matplotlib.pyplot as plt\\nplt.plot([0, 1])', store_history=False).raise_error()\n"
        "fig = Figure()\nfig.subplots().plot([0, 1])\n"
        "shown = shell.display_formatter.format(fig)[0]['image/png']\n"  # matplotlib_inline's: a base64 string
        "print('drawn by plots.png:', isinstance(shown, bytes) and shell.user_ns['plots'].SMALLEST_TEXT.encode() in shown)\n")
    env = {**os.environ, "MPLBACKEND": "module://matplotlib_inline.backend_inline"}  # what ipykernel sets
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.stdout.strip().endswith("drawn by plots.png: True"), done.stdout + done.stderr
