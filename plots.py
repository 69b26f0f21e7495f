"""How every figure of the workbook is drawn and shown: colours (one per factor group, the same in every figure,
GROUP_COLORS; the vision and touch colours also stand for those modalities), sizes that keep every text readable in
JupyterLab (WIDTH, MIN_TEXT_PX, `smallest_text_px`), panels that wrap into rows (`panel_grid`), and `png`, the PNG
that notebooks display and workbook.save_figure writes. The figures themselves, each a function taking tables or
arrays and returning a matplotlib Figure (built without pyplot, so nothing is shown twice or left open), are in one
module per part of the workbook: plots_testbed.py (notebook 01), plots_training.py (phase-1 training and the
study's comparisons, notebooks 02 and 03), plots_prefix.py (quality vs k and what each token knows, notebooks 03
and 05) and plots_captions.py (notebook 04).

Importing this module (every figure module does) inside IPython makes every Figure display as a PNG image (see
`show_figures_as_png`).
"""
from __future__ import annotations

import io
import math
import struct
import textwrap
import zlib

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.text import Text

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


def significant(x, digits: int = 3, tiny_is_zero: bool = True) -> str:
    """A number as the workbook's tables show it: `digits` significant digits and no exponent; below half a unit
    of the `digits`-th decimal it is 0 (a BLEU of 5e-18 is no BLEU) unless not `tiny_is_zero` (a spread over seeds,
    which is as small as the numbers it spreads); a missing one is "–"."""
    if x is None or not np.isfinite(x):
        return "–"
    if tiny_is_zero and abs(x) < 0.5 * 10.0 ** -digits:
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


def panel_grid(n: int, columns: int, panel_height: float, **kwargs) -> tuple[Figure, np.ndarray, np.ndarray]:
    """A figure WIDTH wide with n panels in rows of `columns` (fewer when n is smaller): the panels, and the
    empty slots left in the last row (hidden; a legend may go there)."""
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    fig = Figure(figsize=(WIDTH, panel_height * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False, **kwargs).ravel()
    for ax in axes[n:]:
        ax.axis("off")
    return fig, axes[:n], axes[n:]


def spare_legend(fig: Figure, handles, labels, spare, **kwargs):
    """A legend in an empty slot of the grid when there is one, else under the panels, never over data."""
    if len(spare):
        return spare[0].legend(handles, labels, loc="center", **kwargs)
    return fig.legend(handles, labels, loc="outside lower center", ncols=2, **kwargs)


def wrapped(text: str, width: int) -> str:
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


def image_array(content) -> np.ndarray:
    """A 3×H×W tensor/array in [0, 1] as H×W×3 for imshow."""
    array = content.detach().cpu().numpy() if hasattr(content, "detach") else np.asarray(content)
    return np.clip(array.transpose(1, 2, 0), 0, 1)


def show_content(ax, content):
    """An image, or a caption (the text modality) written into the axes."""
    if isinstance(content, str):
        ax.text(0.5, 0.5, content.replace(", ", ",\n"), ha="center", va="center", fontsize=7)
    else:
        ax.imshow(image_array(content))
    ax.set_xticks([])
    ax.set_yticks([])


def color_factor_labels(labels, groups: dict[str, str]):
    """Each label in its factor's group colour (grey for a row that is no factor, such as the sensors' noise)."""
    for label in labels:
        label.set_color(GROUP_COLORS.get(groups.get(label.get_text()), "0.45"))


def color_labels(labels, colors):
    for label, color in zip(labels, colors):
        label.set_color(color)


def group_legend(target, groups, **kwargs):
    """A legend of the factor groups present, in their colours, on an Axes or (outside the panels) a Figure."""
    present = [g for g in GROUP_COLORS if g in set(groups)]
    target.legend(handles=[Patch(color=GROUP_COLORS[g], label=f"{g} factor" if g == "shared" else f"{g}-only factor")
                       for g in present], fontsize=8, **kwargs)
