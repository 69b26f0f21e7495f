"""Phase-2 evaluation: captions from every token source and k (`evaluate_captions`), and beside each the linear-probe
ceiling of its very tokens (`probe_ceilings`, SynthTouch only)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import information
import probes
import synthtouch
from captioner import MultimodalLLM
from captions import attribute_baselines, caption_metrics, summarize_accuracy
from token_sources import TokenSource, prefix_grid


def caption_eval_sources(mm: MultimodalLLM, modality_sets=None, ks=None) -> list[TokenSource]:
    """The token sources that `evaluate_captions` captions from: each modality alone and all together (or
    `modality_sets`) at every k of the grid (or `ks`), and no prefix (k = 0) once."""
    source = mm.source
    singles = [(m,) for m in source.modalities] if len(source.modalities) > 1 else []
    modality_sets = modality_sets or singles + [source.modalities]
    ks = prefix_grid(source.k) if ks is None else ks
    return ([TokenSource(source.modalities, 0, source.groups)] if 0 in ks else []) + \
        [TokenSource(tuple(ms), k, source.groups) for ms in modality_sets for k in ks if k > 0]


def evaluate_captions(mm: MultimodalLLM, tokens: dict[str, torch.Tensor], references: list[str],
                      factors: list[dict] | None = None, modality_sets=None, ks=None, n_examples: int = 8) -> dict:
    """Caption metrics for every token source of `caption_eval_sources`. Returns {"rows": [{"modalities", "k",
    metrics..., "examples"}]}; the rows are DataFrame-ready."""
    rows = []
    for source in tqdm(caption_eval_sources(mm, modality_sets, ks), desc="caption eval"):
        captions = mm.generate_from_tokens(tokens, source)
        rows.append({"modalities": "none" if source.k == 0 else "+".join(source.modalities), "k": source.k,
                     **caption_metrics(captions, references, factors),
                     "examples": [{"reference": r, "generated": c}
                                  for r, c in zip(references[:n_examples], captions[:n_examples])]})
    return {"rows": rows}


EVAL_FILES = {"test": "caption_eval.json", "val": "caption_eval_val.json"}  # test: reporting; val: choosing


def eval_file(output_dir: str | os.PathLike, split: str) -> Path:
    """Where a phase-2 run keeps its evaluation on `split`."""
    if split not in EVAL_FILES:
        raise ValueError(f"split must be one of {list(EVAL_FILES)} (val chooses settings, test reports), got {split!r}")
    return Path(output_dir) / EVAL_FILES[split]


def split_factors(dataset) -> list[dict] | None:
    """Every sample's SynthTouch factors; None for datasets without them (real data)."""
    return [dataset.factors_of(i) for i in range(len(dataset))] if hasattr(dataset, "factors_of") else None


def source_features(mm: MultimodalLLM, tokens: dict[str, torch.Tensor], source: TokenSource) -> np.ndarray:
    """N×(k·width·modalities): the very tokens the decoder sees from `source`, concatenated (a probe's input)."""
    source = mm.resolve(source)
    index = mm.register_index(source.groups)[:source.k]
    return torch.cat([tokens[m][:, index].flatten(1) for m in source.modalities], 1).float().numpy()


def probe_ceiling(mm: MultimodalLLM, source: TokenSource, fit_tokens: dict[str, torch.Tensor], fit_factors: list[dict],
                  test_tokens: dict[str, torch.Tensor], test_factors: list[dict]) -> dict:
    """What the tokens the decoder sees from `source` know: per caption attribute, the test accuracy of the
    information map's linear probe (`probes.probe("linear")`), fit on `probes.FIT_ROWS` rows of the fit split with
    its regularisation chosen on 500 others of it; keys as attribute_accuracy's. With no tokens (k = 0) a probe
    can only name the fit split's most common value, so the ceiling is the majority baseline."""
    source = mm.resolve(source)
    if source.k == 0:
        return attribute_baselines(fit_factors, test_factors)["majority"]
    order = np.random.default_rng(0).permutation(len(fit_factors))
    rows = dict(fit=order[:probes.FIT_ROWS], select=order[probes.FIT_ROWS:][:500])
    if not len(rows["select"]):  # a fit split of at most FIT_ROWS rows: a fifth of it chooses the regularisation
        rows = dict(fit=order[len(order) // 5:], select=order[:len(order) // 5])
    fit_x, test_x = source_features(mm, fit_tokens, source), source_features(mm, test_tokens, source)
    x = dict(fit=fit_x[rows["fit"]], select=fit_x[rows["select"]], test=test_x)
    codes = {split: [fit_factors[i] for i in index] for split, index in rows.items()} | {"test": test_factors}
    targets = {name: probes.Target(False, {split: np.array([values.index(f[name]) for f in factors])
                                           for split, factors in codes.items()},
                                   {split: np.ones(len(factors), dtype=bool) for split, factors in codes.items()})
               for name, values in synthtouch.SynthTouch.FACTORS.items()}
    per_factor = {name: score for name, (score, _) in information.fit_probes([("linear", x, targets)], 1)[0].items()}
    return summarize_accuracy(per_factor)


def probe_ceilings(mm: MultimodalLLM, sources: list[TokenSource], fit_tokens, fit_factors, test_tokens, test_factors,
                   cache: dict | None = None) -> dict:
    """`probe_ceiling` of every source, kept in `cache` (a dict for one phase-1 model and split: the ceiling
    depends on phase 1 alone, so it serves every phase-2 run of that model). Returns the cache."""
    cache = {} if cache is None else cache
    for source in tqdm(sources, desc="probe ceilings", leave=False):
        if source not in cache:
            cache[source] = probe_ceiling(mm, source, fit_tokens, fit_factors, test_tokens, test_factors)
    return cache


def add_probe_ceiling(rows: list[dict], sources: list[TokenSource], ceilings: dict) -> list[dict]:
    """Put beside each row of `evaluate_captions` the probe ceiling of its tokens (`probe_ceilings`), as
    "probe accuracy ..."; `sources`: the rows' token sources, in order (`caption_eval_sources`)."""
    for row, source in zip(rows, sources, strict=True):
        row.update({f"probe {key}": value for key, value in ceilings[source].items()})
    return rows
