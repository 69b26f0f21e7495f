"""Coarse-to-fine evaluation of a phase-1 model: how good is each prefix of k tokens? One pass per modality
(prefixes.py) feeds every measure:

evaluate_prefixes  retrieval R@1/R@5 (exact pair, and factor level on SynthTouch or caption level on real data,
                   directly and by flow transport; retrieval.py), on TVL data also TVL's own touch–vision top-1
                   (tvl_top1), and preservation cosine for every k → a table with one row per k, and eval.json
readout_cosine     the preservation cosine of a ridge read-out of the same tokens, beside the trained decoder's
evaluate_run       all of it for a run: eval.json, and beside it leakage.csv, information.csv (information.py) and
                   confusion.csv (retrieval.retrieval_confusion), read back by read_eval, read_information,
                   read_confusion
prefix_drops       is quality non-decreasing in k? the largest drop next to the test set's sampling noise
attention_maps     where each register looks among the image patches; project_2d: embeddings in 2-D
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import alignment
import loop
import probes
from config import atomic_write
from features import Features
from information import information_map, leakage_by_k, leakage_columns
from prefixes import encode_all, prefix_ks
from retrieval import (TVL_TOP1, chance_recall, factor_match, retrieval_confusion, retrieval_metrics,
                       shared_discrete_factors, tvl_top1)
from synthtouch import SynthTouch


def evaluate_prefixes(model: alignment.AlignmentModel, features: dict[str, Features],
                      factors: dict[str, np.ndarray] | None, ks=None, shared_factors=None, batch_size=256,
                      out_path=None, one_pass: bool = True, encoded: dict | None = None,
                      tvl: bool = False) -> pd.DataFrame:
    """Quality of every prefix length k on one split, from one forward pass per modality.

    Rows: k (the number of tokens used; the adapter's only row is k = 1, its full embedding).
    Columns: '<a>-><b> R@{1,5} pair' (the paired item is retrieved), '... factor' (an item with the same
    shared discrete factors is; SynthTouch `factors`), '... caption' (an item with the same caption is; real
    data, whose `factor_table()` is {"caption": codes}: its chance level follows the caption frequencies),
    '... flow' (queries transported to the other modality by the flow head first; flow-matching models only),
    '<m> recon cos' (preservation decoder) and the chance level of each recall ('chance@1 pair', ...); with `tvl`
    (TVL-layout data) and both vision and touch, TVL's own number beside them ('touch<->vision TVL top-1'). Written
    to `out_path` as {k: {metric: value}} JSON when given.
    """
    ks = prefix_ks(model, ks)
    encoded = encoded or encode_all(model, features, ks, batch_size, one_pass)  # `encoded`: encode_all's, given
    n = len(features[model.cfg.modalities[0]].pooled)
    relevant = {"pair": torch.eye(n, dtype=torch.bool)}
    if factors is not None and "caption" in factors:  # real data: captions repeat, so the same caption is a hit
        relevant["caption"] = factor_match(factors, ["caption"])
    elif factors is not None:
        names = list(shared_factors or shared_discrete_factors())
        unknown = [name for name in names if name not in factors]
        if unknown:
            raise ValueError(f"factors lack the shared factors {unknown}; have {sorted(factors)}. Pass "
                             "shared_factors=[...] naming the factors both modalities see, or factors=None")
        relevant["factor"] = factor_match(factors, names)
    chance = {f"chance@{r} {level}": value for level, rel in relevant.items()
              for r, value in chance_recall(rel).items()}
    flow = getattr(model, "flow", None)
    rows = {}
    for k in ks:
        row = {}
        for a in model.cfg.modalities:
            for b in model.cfg.modalities:
                if a == b:
                    continue
                query, gallery = encoded[a].embeddings[k], encoded[b].embeddings[k]
                row.update(retrieval_metrics(query, gallery, relevant, f"{a}->{b}"))
                if flow is not None:
                    moved = flow.transport(query.to(next(flow.parameters()).device), f"{a}->{b}").cpu()
                    row.update(retrieval_metrics(moved, gallery, relevant, f"{a}->{b}", " flow"))
        if tvl and {"vision", "touch"} <= set(encoded):
            row[TVL_TOP1] = tvl_top1(encoded["touch"].embeddings[k], encoded["vision"].embeddings[k])
        for m, enc in encoded.items():
            if enc.recon is not None:
                row[f"{m} recon cos"] = enc.recon[k].mean().item()
        rows[k] = {**row, **chance}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "k"
    if out_path is not None:
        write_eval(table, out_path)
    return table


def readout_cosine(tokens: dict[str, torch.Tensor], features: dict[str, Features], ks: list[int]) -> dict[int, float]:
    """What the first k tokens hold of the frozen features, read without the trained decoder: the preservation
    cosine of a ridge regression from the first k tokens (concatenated) to every frozen token feature, fit on the
    'fit' split, its strength chosen on 'select', scored on 'test' (`tokens`, `features`: split → one modality's
    register outputs and frozen features). Both sides are measured from the split's mean token, as `encode`'s
    preservation cosine is, so the two are one measure: where the decoder falls short of this, it is the
    decoder, not the tokens, that loses the information."""
    targets = {split: f.tokens.numpy().astype(np.float32) if isinstance(f.tokens, torch.Tensor) else
               np.asarray(f.tokens, dtype=np.float32) for split, f in features.items()}
    masks = {split: np.asarray(f.mask, dtype=np.float32) for split, f in features.items()}
    centres = {split: f.mean_token().numpy() for split, f in features.items()}
    shape, offset = targets["fit"].shape[1:], targets["fit"].mean(0).reshape(1, -1)

    def cosine_of(prediction, split):
        return probes.preservation_cosine(prediction.reshape(-1, *shape) + offset.reshape(1, *shape), targets[split],
                                          centres[split], masks[split])

    Y = targets["fit"].reshape(len(targets["fit"]), -1) - offset
    out = {}
    for k in ks:
        # standardised by the fit rows, so those are centred already
        x = probes.standardised({split: t[:, :k].flatten(1).numpy() for split, t in tokens.items()})
        path = probes.RidgePath(x["fit"])
        B, select = path.coefficients(Y), path.project(x["select"])
        best = max(path.alphas, key=lambda alpha: cosine_of(path.predict(select, B, alpha), "select"))
        out[k] = cosine_of(path.predict(path.project(x["test"]), B, best), "test")
    return out


def decoder_and_readout(table: pd.DataFrame, modalities) -> dict[str, pd.DataFrame]:
    """An eval table's preservation cosines in two tables of the same columns ('<m> preservation cosine'): the
    trained decoder's ('<m> recon cos') and the ridge read-out's from the same tokens ('<m> readout cos'), for
    plots_prefix.prefix_curves to draw side by side."""
    return {name: table[[f"{m} {column}" for m in modalities]].set_axis([f"{m} preservation cosine" for m in modalities],
                                                                         axis=1)
            for name, column in (("trained decoder", "recon cos"), ("ridge read-out of the same tokens", "readout cos"))}


def write_eval(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """A table of rows k as eval.json, {k: {metric: value}}, written atomically, and as the run folder's
    TensorBoard events (quality against k)."""
    written = atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(
        {str(k): row for k, row in table.to_dict(orient="index").items()}, indent=1)))
    loop.RunFolder(Path(path).parent).log_table(f"eval {Path(path).stem} vs k", table)
    return written


def evaluate_run(model: alignment.AlignmentModel, features: dict[str, Features], factors: dict[str, np.ndarray] | None,
                 probe_splits: dict[str, tuple[dict[str, Features], dict[str, np.ndarray]]] | None = None,
                 out_path=None, tvl: bool = False, threads=None) -> pd.DataFrame:
    """`evaluate_prefixes` (with `tvl`) and, on SynthTouch (where private factors are known), the leakage columns of
    `leakage_columns` for every k: probes fit on `probe_splits["fit"]` (features, factors: the training split),
    tuned on `probe_splits["select"]` (the validation split) and scored on `features`; beside each preservation
    cosine, '<m> readout cos', the same cosine from a ridge read-out of the same tokens (`readout_cosine`).
    The whole leakage table goes beside `out_path` as leakage.csv, the information map (every factor from
    every token, `information_map`, on the same splits) as information.csv, and which shared
    factors retrieval gets wrong (`retrieval_confusion`) as confusion.csv, so notebooks can draw all three for
    runs whose weights they do not have (`read_information`, `read_confusion`). `threads()`, asked before each
    part, is how many threads it computes on (train.py passes the run's `threads`, as the training steps have it)."""

    def share():  # in make demo, 04 starts beside 02's evaluation once the weights are final, a poll after it began
        if threads is not None:
            loop.use_threads(threads())

    share()
    ks = prefix_ks(model)
    encoded = encode_all(model, features, ks)  # once, for retrieval and the leakage probes alike
    table = evaluate_prefixes(model, features, factors, ks, encoded=encoded, tvl=tvl)
    private = [name for name, group in SynthTouch.factor_groups.items() if group != "shared"]
    if probe_splits is not None and factors is not None and all(name in factors for name in private):
        splits = {split: encode_all(model, probe_splits[split][0], ks, reconstruct=False) for split in ("fit", "select")}
        all_encoded = {**splits, "test": encoded}
        all_factors = {**{split: probe_splits[split][1] for split in splits}, "test": factors}
        share()  # the probes fit in as many processes as torch has threads
        leaks = leakage_by_k(model, all_encoded, all_factors, ks)
        table = table.join(leakage_columns(leaks))
        if hasattr(model, "decoders"):  # beside the trained decoder's cosine, what a ridge read-out gets
            all_features = {**{split: probe_splits[split][0] for split in splits}, "test": features}
            share()
            for m in tqdm(model.cfg.modalities, desc="ridge read-out of the features", leave=False):
                readout = readout_cosine({split: enc[m].tokens for split, enc in all_encoded.items()},
                                         {split: f[m] for split, f in all_features.items()}, ks)
                table[f"{m} readout cos"] = pd.Series(readout)
        if out_path is not None:
            atomic_write(Path(out_path).with_name("leakage.csv"), lambda tmp: leaks.to_csv(tmp, index=False))
            share()
            info = information_map({split: {m: e.tokens for m, e in enc.items()} for split, enc in all_encoded.items()},
                                   all_factors, model.cfg.n_shared)
            atomic_write(Path(out_path).with_name("information.csv"), lambda tmp: info.to_csv(tmp, index=False))
    if out_path is not None and factors is not None and all(name in factors for name in shared_discrete_factors()):
        confusion = retrieval_confusion(encoded, factors, ks)
        atomic_write(Path(out_path).with_name("confusion.csv"), lambda tmp: confusion.to_csv(tmp, index=False))
    if out_path is not None:
        write_eval(table, out_path)
    return table


def read_run_table(run_dir: str | os.PathLike, name: str, written_by: str) -> pd.DataFrame:
    """A table `evaluate_run` wrote beside eval.json; a missing one says which runs have it (`written_by`)."""
    path = Path(run_dir) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {written_by}; re-train {Path(run_dir)}")
    return pd.read_csv(path)


def read_information(run_dir: str | os.PathLike) -> pd.DataFrame:
    """The information map a run's evaluation wrote (information.csv), as `information_map` returned it."""
    return read_run_table(run_dir, "information.csv", "runs evaluated with leakage probes write it (train.py with "
                          "leakage_probes: true, the default)")


def read_confusion(run_dir: str | os.PathLike) -> pd.DataFrame:
    """The confusion.csv a run's evaluation wrote (`retrieval_confusion`)."""
    return read_run_table(run_dir, "confusion.csv", "runs evaluated on SynthTouch since it came (2026-12) write it, "
                          "and docs/study has it for the study runs notebook 03 reads (study.finished_run(..., "
                          "needs=('confusion.csv',)) falls back to them)")


def read_eval(path: str | os.PathLike) -> pd.DataFrame:
    """An eval.json written by `evaluate_prefixes`, back as its table."""
    rows = json.loads(Path(path).read_text())
    table = pd.DataFrame.from_dict({int(k): v for k, v in rows.items()}, orient="index")
    table.index.name = "k"
    return table


def retrieval_columns(table: pd.DataFrame) -> pd.DataFrame:
    """What train.py prints and notebook 05 shows of an eval.json table: R@1 of every direction and level, each
    level's chance, and on TVL-layout data TVL's own touch–vision top-1 (TVL_TOP1)."""
    return table[[c for c in table.columns if " R@1" in c or c.startswith("chance@1") or c == TVL_TOP1]]


# ----------------------------------------------------------------------------------------------
# Is quality non-decreasing in k? Drops are judged against sampling noise of the test set.

def prefix_drops(table: pd.DataFrame, n_queries: int, z: float = 2.0) -> pd.DataFrame:
    """For every recall column: the largest drop from a shorter prefix k to a longer one k' > k, and the
    noise level it is judged against, z standard errors of the difference of two recalls measured on
    `n_queries` queries each, sqrt(p(1−p)/n + p'(1−p')/n). That treats the two recalls as independent;
    they share their queries, so the true noise is smaller and the test is lenient only by that much.
    'any drop beyond noise' True means some longer prefix is really worse than a shorter one."""
    ks = list(table.index)
    rows = []
    for metric in [c for c in table.columns if " R@" in c]:
        p = table[metric].to_numpy()
        pairs = [(p[i] - p[j], z * np.sqrt((p[i] * (1 - p[i]) + p[j] * (1 - p[j])) / n_queries), ks[i], ks[j])
                 for i in range(len(p)) for j in range(i + 1, len(p))]
        drop, noise, k_from, k_to = max(pairs, default=(0.0, 0.0, ks[0], ks[0]))
        rows.append({"metric": metric, "largest drop": drop, "from k": k_from, "to k": k_to, "noise (z·SE)": noise,
                     "any drop beyond noise": any(d > n for d, n, _, _ in pairs)})
    return pd.DataFrame(rows).set_index("metric")


def prefix_summary(tables: dict[str, pd.DataFrame], n_queries: int, k_shared: int) -> pd.DataFrame:
    """One row per run (`tables`: name → `read_eval` table): vision→touch recall and the vision preservation
    cosine at k = 1 beside the full shared embedding (k = k_shared) and all tokens, and its largest recall drop
    against the noise (`prefix_drops`): notebook 03's nested-dropout ablation table."""
    summary = {}
    for name, table in tables.items():
        drops = prefix_drops(table, n_queries)
        summary[name] = {"R@1 pair at k=1": table.loc[1, "vision->touch R@1 pair"],
                         f"R@1 pair at k={k_shared}": table.loc[k_shared, "vision->touch R@1 pair"],
                         "R@1 factor at k=1": table.loc[1, "vision->touch R@1 factor"],
                         f"R@1 factor at k={k_shared}": table.loc[k_shared, "vision->touch R@1 factor"],
                         "vision recon cos at k=1": table.loc[1, "vision recon cos"],
                         f"vision recon cos at k={table.index[-1]}": table["vision recon cos"].iloc[-1],
                         "largest recall drop": drops["largest drop"].max(),
                         "noise (2 SE) at that drop": drops.loc[drops["largest drop"].idxmax(), "noise (z·SE)"],
                         "any drop beyond noise": bool(drops["any drop beyond noise"].any())}
    return pd.DataFrame(summary).T


# ----------------------------------------------------------------------------------------------
# Attention and embedding views

@torch.no_grad()
def attention_maps(model: alignment.AlignmentModel, modality: str, features: Features, index: int) -> np.ndarray:
    """R×h×w: where each register looks among the image patches of sample `index` (last block)."""
    if not model.design.has_registers:
        raise ValueError(f"the {model.cfg.design} design has no registers and so no attention maps; use a flextok "
                         "or fluxtalk model")
    feats = features.batch(np.array([index]), next(model.parameters()).device)
    maps = model.encoders[modality].attention_maps(feats.tokens, feats.mask)[0].cpu().numpy()
    side = int(round(maps.shape[1] ** 0.5))
    if side * side != maps.shape[1]:
        raise ValueError(f"{modality} has {maps.shape[1]} input tokens, not a square patch grid; attention "
                         "maps can only be drawn over images")
    return maps.reshape(-1, side, side)


def project_2d(embeddings: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """One PCA of all modalities' L2-normalised embeddings, so aligned modalities land together."""
    from sklearn.decomposition import PCA
    names = list(embeddings)
    normed = [F.normalize(embeddings[m], dim=-1).numpy() for m in names]
    points = PCA(2, random_state=0).fit_transform(np.concatenate(normed))
    return dict(zip(names, np.split(points, np.cumsum([len(x) for x in normed])[:-1])))
