"""The notebooks' interactive views: `NeighbourViewer`, a query and its nearest neighbours of the other
modality at the prefix length k that a slider picks (notebook 03), and `CaptionsByK`, captions written from the first
k tokens (notebook 04). Built on prefixes.py's embeddings and plots_prefix.py's figures."""
from __future__ import annotations

import html

import ipywidgets
import numpy as np
import torch.nn.functional as F

import plots
import plots_prefix
from alignment import batch_inputs
from prefixes import Encoded
from retrieval import shared_discrete_factors
from synthtouch import SynthTouch

class NeighbourViewer:
    """A query of one modality and its top-5 neighbours of another, at the prefix length the slider
    says. `viewer.widget` is what the notebook displays; `viewer.slider.value = k` redraws, and
    `viewer.figure` / `viewer.neighbours` hold what was drawn (so the callback is testable headless).
    The figure is shown as PNG bytes in an Image widget: a widget value the browser redraws on every
    change, in any front end, with no captured display output to go stale."""

    def __init__(self, encoded: dict[str, Encoded], dataset, query: int = 0, source="vision", target="touch",
                 top: int = 5, shared_factors=None):
        for m in (source, target):
            if m not in encoded:
                raise ValueError(f"no embeddings for {m!r}; have {sorted(encoded)}")
        self.encoded, self.dataset, self.source, self.target, self.top = encoded, dataset, source, target, top
        self.shared_factors = list(shared_factors or shared_discrete_factors())
        ks = sorted(encoded[source].embeddings)
        self.slider = ipywidgets.SelectionSlider(options=ks, value=ks[-1], description="k tokens")
        self.query = ipywidgets.BoundedIntText(value=query, min=0, max=len(dataset) - 1, description="query")
        self.image = ipywidgets.Image(format="png")
        self.figure, self.neighbours = None, None
        self.slider.observe(lambda change: self.draw(), names="value")
        self.query.observe(lambda change: self.draw(), names="value")
        self.widget = ipywidgets.VBox([ipywidgets.HBox([self.slider, self.query]), self.image])
        self.draw()

    def neighbours_at(self, k: int, query: int) -> np.ndarray:
        """Indices of the `top` gallery items most similar to the query at prefix length k."""
        q = F.normalize(self.encoded[self.source].embeddings[k][query], dim=-1)
        gallery = F.normalize(self.encoded[self.target].embeddings[k], dim=-1)
        return (gallery @ q).topk(self.top).indices.numpy()

    @staticmethod
    def describe(item) -> list[tuple[str, str]]:
        """(text, factor group) lines under an item: its discrete factors, or its caption without them."""
        factors = item.get("factors") or {}
        lines = [(str(factors[f]), SynthTouch.factor_groups[f]) for f in SynthTouch.FACTORS if f in factors]
        return lines or [(item["caption"], "shared")]

    def panel(self, k: int, query: int) -> dict:
        """What one row of the figure shows: the query, its neighbours, and which of them match."""
        query_item = self.dataset[query]
        known = bool(query_item.get("factors"))
        neighbours = []
        for i in self.neighbours_at(k, query):
            item = self.dataset[int(i)]
            same = known and all(item["factors"][f] == query_item["factors"][f] for f in self.shared_factors)
            neighbours.append(dict(content=batch_inputs(item, self.target), lines=self.describe(item),
                                   pair=int(i) == query, factor_match=same))
        return dict(title=f"k = {k}: {self.source} query {query} → top-{self.top} {self.target}",
                    query=dict(content=batch_inputs(query_item, self.source), lines=self.describe(query_item)),
                    neighbours=neighbours)

    def draw(self):
        k, query = self.slider.value, self.query.value
        self.neighbours = self.neighbours_at(k, query)
        self.figure = plots_prefix.neighbours([self.panel(k, query)])
        self.image.value = plots.png(self.figure)

    def static_figure(self, ks):
        """The same view for a few k at once, one row for each k (in increasing order, each once, so a notebook
        may ask for [1, 2, n_shared] whatever n_shared is): the notebook reads well without a kernel."""
        return plots_prefix.neighbours([self.panel(k, self.query.value) for k in sorted(set(ks))])


class CaptionsByK:
    """A few samples' true captions beside those written from their first k tokens, k picked by a slider: a slider
    and an HTML widget (`widget`), not `ipywidgets.interact`, whose first call switches IPython to matplotlib's
    inline backend, after which every figure of the notebook showed through matplotlib_inline, not plots.png."""

    def __init__(self, samples: list[dict], by_k: dict[int, list[str]]):
        ks = sorted(by_k)
        self.samples, self.by_k = samples, by_k
        self.slider = ipywidgets.SelectionSlider(options=ks, value=ks[-1], description="k")
        self.table = ipywidgets.HTML()
        self.slider.observe(lambda change: self.draw(), names="value")
        self.widget = ipywidgets.VBox([self.slider, self.table])
        self.draw()

    def draw(self):
        k = self.slider.value
        rows = "".join(f"<tr><td>{html.escape(s['caption'])}</td><td>{html.escape(c)}</td></tr>"
                       for s, c in zip(self.samples, self.by_k[k]))
        self.table.value = f"<b>k = {k}</b><table><tr><th>true</th><th>generated</th></tr>{rows}</table>"
