"""Coarse-to-fine evaluation of a phase-1 model: how good is each prefix of k tokens, and what does
each token know?

encode             one forward pass per modality → every register output, the shared embedding for
                   every prefix length k, and the preservation cosine for every k
evaluate_prefixes  retrieval R@1/R@5 (exact pair, and factor level on SynthTouch or caption level on real data,
                   directly and by flow transport), on TVL data also TVL's own touch–vision top-1 (tvl_top1), and
                   preservation cosine for every k → a table with one row per k, and eval.json
retrieval_confusion
                   which values of each shared factor the top-1 of retrieval mixes up, for every k
                   (confusion.csv); top1_differs: the share of queries it gets wrong, factor by factor
prefix_drops       is quality non-decreasing in k? the largest drop next to the test set's sampling noise
information_map    linear probes of every factor from every single token and from each token group
group_summary      probe scores per factor from each modality's shared and private groups, with chance
leakage            private factors decoded from shared tokens, next to chance
attention_maps     where each register looks among the image patches; project_2d: embeddings in 2-D
NeighbourViewer    an ipywidgets slider over k: a query and its top-5 neighbours of the other modality

Because register i never attends to registers after it (registers.register_attention_mask), the first k
outputs of one pass with all registers equal a pass that only has k registers; `encode(one_pass=False)`
runs those truncated passes, as the reference the tests and bench/bench_eval.py compare against.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

import alignment
import loop
import probes
from config import atomic_write
from features import Features
from synthtouch import SynthTouch

RANKS = (1, 5)
GROUP_ORDER = ("shared", "vision", "touch")  # factor groups: who sees a factor


def shared_discrete_factors() -> list[str]:
    """SynthTouch's discrete factors that both camera and gel see: factor-level retrieval compares these."""
    return [name for name in SynthTouch.FACTORS if SynthTouch.factor_groups[name] == "shared"]


def prefix_ks(model: alignment.AlignmentModel, ks=None) -> list[int]:
    """The prefix lengths to evaluate: the model's 1, 2, 4, ..., n_registers grid, or `ks` checked."""
    default = model.design.prefix_lengths
    if ks is None:
        return default
    ks = sorted({int(k) for k in ks})
    bad = [k for k in ks if not 1 <= k <= model.n_tokens]
    if bad:
        raise ValueError(f"prefix lengths {bad} are outside 1..{model.n_tokens}, the number of tokens of this "
                         f"{model.cfg.design} model; pass ks=None for its grid {default}")
    return ks


# ----------------------------------------------------------------------------------------------
# One pass: tokens, prefix embeddings, preservation cosine

class Encoded(NamedTuple):
    tokens: torch.Tensor | None  # N×R×hidden, every register output (None for truncated passes)
    embeddings: dict[int, torch.Tensor]  # k → N×embed_dim, un-normalised shared embedding of the first k tokens
    recon: dict[int, torch.Tensor] | None  # k → N preservation cosine (None without a preservation decoder)


@torch.no_grad()
def encode(model: alignment.AlignmentModel, modality: str, features: Features, ks: list[int],
           batch_size: int = 256, one_pass: bool = True, progress: bool = False, reconstruct: bool = True) -> Encoded:
    """Everything evaluation needs for one modality, on the CPU. `one_pass=False` runs the register
    module once per k with only k registers (the slow reference); `reconstruct=False` skips the
    preservation decoder (probes need only tokens and embeddings)."""
    device = next(model.parameters()).device
    n = len(features.pooled)
    has_decoder = hasattr(model, "decoders") and reconstruct
    centre = features.mean_token().to(device) if has_decoder else None
    tokens, embeddings, recon = [], {k: [] for k in ks}, {k: [] for k in ks}
    for start in tqdm(range(0, n, batch_size), desc=f"encode {modality}", disable=not progress, leave=False):
        feats = features.batch(np.arange(start, min(start + batch_size, n)), device)
        if one_pass or not model.design.has_registers:
            out = model.tokens(modality, feats)
            tokens.append(out.cpu())
            per_k = {k: out for k in ks}
        else:
            per_k = {k: model.tokens(modality, feats, n_registers=k) for k in ks}
        for k, out in per_k.items():
            embeddings[k].append(model.prefix_embeddings(modality, out, [k])[k].cpu())
            if has_decoder:
                recon[k].append(model.reconstruction_cosine(modality, out, feats, [k], centre)[k].cpu())
    return Encoded(torch.cat(tokens) if tokens else None,
                   {k: torch.cat(v) for k, v in embeddings.items()},
                   {k: torch.cat(v) for k, v in recon.items()} if has_decoder else None)


def encode_all(model, features: dict[str, Features], ks, batch_size=256, one_pass=True,
               progress=False, reconstruct=True) -> dict[str, Encoded]:
    """`encode` for every modality of the model, in eval mode (the model's mode is restored after)."""
    missing = [m for m in model.cfg.modalities if m not in features]
    if missing:
        raise ValueError(f"features lack modalities {missing} of this model (it aligns {model.cfg.modalities}); "
                         "pass features for every modality, e.g. from phase1.split_data(cfg, 'test')")
    sizes = {m: len(features[m].pooled) for m in model.cfg.modalities}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"modalities have different numbers of samples {sizes}; retrieval needs paired rows")
    was_training = model.training
    model.eval()
    try:
        return {m: encode(model, m, features[m], ks, batch_size, one_pass, progress, reconstruct)
                for m in model.cfg.modalities}
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------
# Retrieval

def cosine(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    return F.normalize(queries, dim=-1) @ F.normalize(gallery, dim=-1).T


def top_items(similarity: torch.Tensor, depth: int = max(RANKS)) -> torch.Tensor:
    """For each query (row), its `depth` most similar gallery items, best first. Recall and `nearest` both rank
    with this call at the same depth (topk breaks ties differently at another depth), so where items tie (rounded
    FSQ codes can), both see the same top-1."""
    return similarity.topk(min(depth, similarity.shape[1]), dim=1).indices


def recall_at(similarity: torch.Tensor, relevant: torch.Tensor, ranks=RANKS) -> dict[int, float]:
    """Fraction of queries (rows) with a relevant gallery item (column) among their top-r most similar."""
    hits = relevant.gather(1, top_items(similarity, max(ranks)))
    return {r: hits[:, :r].any(1).float().mean().item() for r in ranks}


def factor_match(factors: dict[str, np.ndarray], names: list[str]) -> torch.Tensor:
    """N×N bool: items i and j agree on every factor in `names`."""
    codes = torch.as_tensor(np.stack([np.asarray(factors[name]) for name in names], 1))
    return (codes[:, None, :] == codes[None, :, :]).all(-1)


def chance_recall(relevant: torch.Tensor, ranks=RANKS) -> dict[int, float]:
    """Expected recall@r of a random ranking: 1 − C(N−m, r)/C(N, r) for a query with m relevant items."""
    n = relevant.shape[1]
    m = relevant.sum(1).double()
    out = {}
    for r in ranks:
        miss = torch.ones_like(m)
        for j in range(min(r, n)):
            miss = miss * ((n - m - j) / (n - j)).clamp(min=0)
        out[r] = (1 - miss).mean().item()
    return out


def retrieval_metrics(queries: torch.Tensor, gallery: torch.Tensor, relevant: dict[str, torch.Tensor],
                      prefix: str, suffix: str = "") -> dict[str, float]:
    """R@1/R@5 for every relevance level ("pair", "factor"); columns like 'vision->touch R@1 pair'."""
    similarity = cosine(queries, gallery)
    out = {}
    for level, rel in relevant.items():
        for r, value in recall_at(similarity, rel).items():
            out[f"{prefix} R@{r} {level}{suffix}"] = value
    return out


TVL_TOP1 = "touch<->vision TVL top-1"  # the eval.json column of tvl_top1


def tvl_top1(touch: torch.Tensor, vision: torch.Tensor) -> float:
    """TVL's touch–vision accuracy (Fu et al. 2024) as its code computes it, so a number set beside TVL's is the same
    quantity: tvl_enc/loss.py's TVLLoss.get_acc_from_affinity for a pair without text, on the whole test set as one
    batch (tools/visualize_affinity.py --evaluate_all). The affinity of the L2-normalised embeddings, a touch item a
    row and a vision item a column; each row's top-1 (timm's accuracy, by topk) is a hit when it is the row's own
    pair (touch→vision), each column's likewise (vision→touch); the two accuracies averaged. A fraction where TVL
    prints percent; chance is 1/N. It is the mean of the two directions' exact-pair R@1 but for ties, and is
    computed on its own so that what is reported as TVL's number follows TVL's definition rather than ours."""
    affinity = cosine(touch, vision)
    pairs = torch.arange(len(affinity))
    touch_to_vision = (affinity.topk(1, dim=1).indices[:, 0] == pairs).float().mean()
    vision_to_touch = (affinity.T.topk(1, dim=1).indices[:, 0] == pairs).float().mean()
    return ((touch_to_vision + vision_to_touch) / 2).item()


def nearest(queries: torch.Tensor, gallery: torch.Tensor, ranks=RANKS) -> torch.Tensor:
    """For each query, the index of its most similar gallery item (cosine): the top-1 that `recall_at` with the
    same `ranks` judges."""
    return top_items(cosine(queries, gallery), max(ranks))[:, 0]


def top1_confusion(factors: dict[str, np.ndarray], name: str, top1: torch.Tensor) -> pd.DataFrame:
    """Counts of (the query's value, its top-1 item's value) of a SynthTouch factor: which values retrieval mixes up."""
    values = SynthTouch.FACTORS[name]
    codes = np.asarray(factors[name])
    counts = np.zeros((len(values), len(values)), dtype=int)
    np.add.at(counts, (codes, codes[top1.numpy()]), 1)
    return pd.DataFrame(counts, index=pd.Index(values, name="query"), columns=pd.Index(values, name="retrieved"))


def retrieval_confusion(encoded: dict[str, Encoded], factors: dict[str, np.ndarray], ks: list[int],
                        names: list[str] | None = None) -> pd.DataFrame:
    """Where factor-level retrieval fails: for every k, direction a->b and shared discrete factor (`names`), the
    `top1_confusion` counts, one row per (query value, retrieved value) with its count. evaluate_run writes it as
    confusion.csv; `confusion_matrix` and `top1_differs` read it."""
    rows = []
    for k in ks:
        for a in encoded:
            for b in encoded:
                if a == b:
                    continue
                top1 = nearest(encoded[a].embeddings[k], encoded[b].embeddings[k])
                for name in names or shared_discrete_factors():
                    counts = top1_confusion(factors, name, top1).stack()
                    rows += [{"k": k, "direction": f"{a}->{b}", "factor": name, "query": query, "retrieved": retrieved,
                              "count": int(count)} for (query, retrieved), count in counts.items()]
    return pd.DataFrame(rows)


def confusion_matrix(confusion: pd.DataFrame, k: int, factor: str, direction: str = "vision->touch") -> pd.DataFrame:
    """One factor's query-value × retrieved-value counts at prefix length k, values in SynthTouch's order."""
    rows = confusion[(confusion.k == k) & (confusion.direction == direction) & (confusion.factor == factor)]
    if rows.empty:
        raise ValueError(f"no confusion counts for k={k}, {direction}, {factor!r}; the table has k "
                         f"{sorted(confusion.k.unique().tolist())}, directions {sorted(confusion.direction.unique())}, "
                         f"factors {sorted(confusion.factor.unique())}")
    values = SynthTouch.FACTORS[factor]
    unknown = sorted((set(rows["query"]) | set(rows["retrieved"])) - set(values))
    if unknown:
        raise ValueError(f"the confusion counts of {factor!r} name values {unknown} that SynthTouch does not have "
                         f"({values}); the table is of another testbed version: re-evaluate the run with this code")
    counts = rows.pivot(index="query", columns="retrieved", values="count")
    return counts.reindex(index=values, columns=values).fillna(0).astype(int)  # a value never retrieved: 0


def top1_differs(confusion: pd.DataFrame, k: int, direction: str = "vision->touch") -> pd.Series:
    """Per shared factor, the share of queries whose top-1 item has another value of it. A query counts once per
    factor it gets wrong, so the shares add up to at least 1 − R@1 factor, and the largest is at most that."""
    shares = {}
    for factor in confusion.factor.unique():
        counts = confusion_matrix(confusion, k, factor, direction).to_numpy()
        shares[factor] = 1 - np.trace(counts) / counts.sum()
    return pd.Series(shares, name="top-1 differs")


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
        prediction = prediction.reshape(-1, *shape) + offset.reshape(1, *shape) - centres[split]
        target = targets[split] - centres[split]
        cos = (prediction * target).sum(-1) / np.maximum(np.linalg.norm(prediction, axis=-1) *
                                                         np.linalg.norm(target, axis=-1), 1e-8)
        return float(((cos * masks[split]).sum(1) / np.maximum(masks[split].sum(1), 1)).mean())

    Y = targets["fit"].reshape(len(targets["fit"]), -1) - offset
    out = {}
    for k in ks:
        # standardised by the fit rows, so those are centred already; float32 halves the products over 8192 targets
        x = {split: v.astype(np.float32) for split, v in probes.standardised(
            {split: t[:, :k].flatten(1).numpy() for split, t in tokens.items()}).items()}
        path = probes.RidgePath(x["fit"])
        B, select = path.coefficients(Y), path.project(x["select"])
        best = max(path.alphas, key=lambda alpha: cosine_of(path.predict(select, B, alpha), "select"))
        out[k] = cosine_of(path.predict(path.project(x["test"]), B, best), "test")
    return out


def decoder_and_readout(table: pd.DataFrame, modalities) -> dict[str, pd.DataFrame]:
    """An eval table's preservation cosines in two tables of the same columns ('<m> preservation cosine'): the
    trained decoder's ('<m> recon cos') and the ridge read-out's from the same tokens ('<m> readout cos'), for
    plots.prefix_curves to draw side by side."""
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
                 out_path=None, tvl: bool = False) -> pd.DataFrame:
    """`evaluate_prefixes` (with `tvl`) and, on SynthTouch (where private factors are known), the leakage columns of
    `leakage_columns` for every k: probes fit on `probe_splits["fit"]` (features, factors: the training split),
    tuned on `probe_splits["select"]` (the validation split) and scored on `features`; beside each preservation
    cosine, '<m> readout cos', the same cosine from a ridge read-out of the same tokens (`readout_cosine`).
    The whole leakage table goes beside `out_path` as leakage.csv, the information map (every factor from
    every token, `information_map`, on the same splits) as information.csv, and which shared
    factors retrieval gets wrong (`retrieval_confusion`) as confusion.csv, so notebooks can draw all three for
    runs whose weights they do not have (`read_information`, `read_confusion`)."""
    ks = prefix_ks(model)
    encoded = encode_all(model, features, ks)  # once, for retrieval and the leakage probes alike
    table = evaluate_prefixes(model, features, factors, ks, encoded=encoded, tvl=tvl)
    private = [name for name, group in SynthTouch.factor_groups.items() if group != "shared"]
    if probe_splits is not None and factors is not None and all(name in factors for name in private):
        splits = {split: encode_all(model, probe_splits[split][0], ks, reconstruct=False) for split in ("fit", "select")}
        all_encoded = {**splits, "test": encoded}
        all_factors = {**{split: probe_splits[split][1] for split in splits}, "test": factors}
        leaks = leakage_by_k(model, all_encoded, all_factors, ks)
        table = table.join(leakage_columns(leaks))
        if hasattr(model, "decoders"):  # beside the trained decoder's cosine, what a ridge read-out gets
            all_features = {**{split: probe_splits[split][0] for split in splits}, "test": features}
            for m in tqdm(model.cfg.modalities, desc="ridge read-out of the features", leave=False):
                readout = readout_cosine({split: enc[m].tokens for split, enc in all_encoded.items()},
                                         {split: f[m] for split, f in all_features.items()}, ks)
                table[f"{m} readout cos"] = pd.Series(readout)
        if out_path is not None:
            atomic_write(Path(out_path).with_name("leakage.csv"), lambda tmp: leaks.to_csv(tmp, index=False))
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
# Probes: which token knows which factor. Every probe is probes.probe: fit on the training split (FIT_ROWS
# rows), its regularisation chosen on the validation split, scored on the test split.

PROBE_SPLITS = ("fit", "select", "test")


def probe_target(name: str, factors: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(target, rows) of a probe: what it predicts, on which rows. Discrete factors are their class codes,
    on every row. A phase is periodic with the period the renderer draws it with for the row's texture
    (SynthTouch.PHASE_PERIODS), so it is decoded as (cos 2πφ/P, sin 2πφ/P), scored by R², on the rows
    whose texture shows it at all."""
    values = np.asarray(factors[name])
    if name not in SynthTouch.PHASE_PERIODS:  # class codes, or a detail's tile values (R² averaged over tiles)
        return values, np.ones(len(values), dtype=bool)
    textures = np.asarray(SynthTouch.FACTORS["texture"])[factors["texture"]]
    period = np.array([SynthTouch.PHASE_PERIODS[name][t] or np.nan for t in textures], dtype=float)
    rows = ~np.isnan(period)
    angle = 2 * np.pi * values[rows] / period[rows]
    return np.stack([np.cos(angle), np.sin(angle)], 1), rows


def probe_targets(names, factors: dict[str, dict[str, np.ndarray]]) -> dict[str, probes.Target]:
    """The probes.Target of every factor in `names`, from the factor tables of the fit, select and test splits."""
    targets = {}
    for name in names:
        ys, rows = zip(*(probe_target(name, factors[split]) for split in PROBE_SPLITS))
        targets[name] = probes.Target(SynthTouch.is_continuous(name), dict(zip(PROBE_SPLITS, ys)),
                                      dict(zip(PROBE_SPLITS, rows)))
    return targets


def fit_rows(n: int, rows: int = probes.FIT_ROWS) -> np.ndarray:
    """The rows of a split of `n` that probes are fit on: a fixed random subset (seed 0), in order."""
    return np.sort(np.random.default_rng(0).permutation(n)[:rows])


def token_sources(tokens: torch.Tensor, n_shared: int) -> dict[str, np.ndarray]:
    """Feature sets a probe reads: every single token, the shared / private groups and all tokens concatenated."""
    R = tokens.shape[1]
    sources = {f"token {i}": tokens[:, i].numpy() for i in range(R)}
    sources["shared"] = tokens[:, :n_shared].flatten(1).numpy()
    if n_shared < R:
        sources["private"] = tokens[:, n_shared:].flatten(1).numpy()
        sources["all"] = tokens.flatten(1).numpy()
    return sources


def fit_probes(tasks, n_tasks: int, desc: str | None = None, processes: int | None = None) -> list[dict]:
    """`probes.probe(*task)` of every task (an iterable of argument tuples), in order, in `processes` processes
    (None: as many as torch computes on, so a study's runs side by side, one thread each, fit theirs one by one,
    and a notebook in make demo as many as its share). Each probe is a small problem on which BLAS threads only
    contend (30× slower on a busy 2-core machine), so every fit runs on one thread, here or in a worker, and gives
    the same score either way."""
    from joblib import Parallel, delayed, parallel_config
    processes = max(1, min(processes or torch.get_num_threads(), n_tasks))  # one: fit here, one after another
    with threadpool_limits(1), parallel_config(backend="loky", inner_max_num_threads=1):
        results = Parallel(n_jobs=processes, return_as="generator")(delayed(probes.probe)(*task) for task in tasks)
        return list(tqdm(results, total=n_tasks, desc=desc, leave=False, disable=desc is None))


def probe_table(jobs: list[tuple], sources, targets: dict[str, probes.Target], desc: str | None = None) -> pd.DataFrame:
    """Every job (its key, probe kind, factor names) probed: `sources(key)` gives the job's {split: N×D}
    features. One row per (job, factor): the key's fields, probe, factor, score, chance and 'normalised',
    (score − chance) / (1 − chance): 0 is chance, 1 perfect, for accuracies and R² alike."""
    tasks = ((kind, sources(key), {name: targets[name] for name in names}) for key, kind, names in jobs)
    rows = [dict(**key, probe=kind, factor=name, score=score, chance=chance, normalised=(score - chance) / (1 - chance))
            for (key, kind, _), result in zip(jobs, fit_probes(tasks, len(jobs), desc))
            for name, (score, chance) in result.items()]
    return pd.DataFrame(rows)


def information_map(tokens: dict[str, dict[str, torch.Tensor]], factors: dict[str, dict[str, np.ndarray]],
                    n_shared: int) -> pd.DataFrame:
    """Probe every factor from every token and token group of every modality, linearly.

    `tokens`: split ('fit', 'select', 'test') → modality → N×R×hidden register outputs
    (`encode_all(...)[m].tokens`); `factors`: split → factor table. A tidy table, one row per (modality, source,
    factor): group (who sees the factor), metric (accuracy or R²), score, chance, and 'above chance' =
    (score − chance)/(1 − chance), which puts accuracies and R² on one 0-to-1 scale for the heatmap.
    """
    names = [f for f in SynthTouch.factor_groups if all(f in factors[split] for split in PROBE_SPLITS)]
    if not names:
        raise ValueError(f"no SynthTouch factors among {sorted(factors['fit'])}; probes need factor labels "
                         "(dataset.factor_table() of SynthTouch)")
    sources = {m: {split: token_sources(tokens[split][m], n_shared) for split in PROBE_SPLITS} for m in tokens["fit"]}
    jobs = [(dict(modality=m, source=source), "linear", names) for m in sources for source in sources[m]["fit"]]
    table = probe_table(jobs, lambda key: {split: sources[key["modality"]][split][key["source"]] for split in PROBE_SPLITS},
                        probe_targets(names, factors), "information map: linear probes")
    return table.assign(group=table.factor.map(SynthTouch.factor_groups),
                        metric=["R²" if SynthTouch.is_continuous(name) else "accuracy" for name in table.factor]
                        ).rename(columns={"normalised": "above chance"})[
        ["modality", "source", "factor", "group", "metric", "score", "chance", "above chance"]]


def group_summary(info: pd.DataFrame) -> pd.DataFrame:
    """Probe scores of each factor from each modality's shared and private token groups, with chance:
    the numbers behind the information map's claims, one row per factor."""
    groups = info[info.source.isin(["shared", "private"])]
    table = groups.pivot_table(index=["group", "factor", "metric"], columns=["modality", "source"], values="score")
    table.columns = [f"{m} {source}" for m, source in table.columns]
    chance = groups.groupby(["group", "factor", "metric"]).chance.first()
    return table.assign(chance=chance).reindex(list(GROUP_ORDER), level="group")


def order_by_token(info: pd.DataFrame) -> pd.DataFrame:
    """The information map's order in one table: per modality, factor kind (who sees it × coarse or fine,
    SynthTouch.SCALE) and single token i, the mean probe score above chance, a factor at or below chance counting
    as 0 (none: below chance is sampling noise, not less than nothing). Coarse factors should be read from the first
    token on, fine ones only from later tokens, and the other modality's private factors from none."""
    single = info[info.source.str.startswith("token ")].copy()
    single["token"] = single.source.str.removeprefix("token ").astype(int)
    owner = np.where(single.group == "shared", "shared", np.where(single.group == single.modality, "own private",
                                                                  "other private"))
    single["kind"] = owner + " · " + single.factor.map(SynthTouch.SCALE)
    single["above chance"] = single["above chance"].clip(lower=0)
    return single.pivot_table(index=["modality", "kind"], columns="token", values="above chance")


def leakage(info: pd.DataFrame) -> pd.DataFrame:
    """For every private factor: how well the shared tokens of its own modality decode it (leakage), next to
    its private tokens and chance, and the other modality's shared tokens as a sanity control: that sensor
    never sees the factor (SynthTouch renders it bit-identically), so they sit at chance for any model, an
    untrained one included. 'other modality' names it (the best one, when there are several)."""
    rows = []
    private = info[info.group.isin(["vision", "touch"]) & info.source.isin(["shared", "private"])]
    for (factor, group), part in private.groupby(["factor", "group"], sort=False):
        own, other = part[part.modality == group], part[part.modality != group]
        row = dict(factor=factor, group=group, metric=part.metric.iloc[0], chance=part.chance.iloc[0])
        row["own private"] = own[own.source == "private"].score.max()
        row["own shared"] = own[own.source == "shared"].score.max()
        others = other[other.source == "shared"]
        if len(others):  # with several other modalities, the one that decodes the factor best
            best = others.loc[others.score.idxmax()]
            row["other shared (control)"], row["other modality"] = best.score, best.modality
        rows.append(row)
    return pd.DataFrame(rows)

# ----------------------------------------------------------------------------------------------
# Leakage: what a modality's shared representation gives away about its own private factors
#
# The protocol of the identifiability literature (Daunhawer et al., ICLR 2023): probes are fit on one
# split and scored on another, linear AND non-linear (probes.PROBES: ridge on the features and on an RBF kernel
# of them), since a representation can hide a factor from a linear read-out and still carry it. Scores are
# normalised, (score − chance) / (1 − chance), so 0 is chance and 1 is perfect for every factor and metric alike.

PROBES = probes.PROBES


def source_rows(encoded: Encoded, source: str, k: int, n_shared: int) -> np.ndarray:
    """N×features of one probe source: 'shared tokens' (first k ≤ n_shared registers, concatenated), 'shared
    embedding' (the aligned embedding of the first k), 'private tokens' (registers n_shared..k−1)."""
    if source == "shared tokens":
        return encoded.tokens[:, :k].flatten(1).numpy()
    if source == "shared embedding":
        return encoded.embeddings[k].numpy()
    return encoded.tokens[:, n_shared:k].flatten(1).numpy()


def leakage_by_k(model: alignment.AlignmentModel, encoded: dict[str, dict[str, Encoded]],
                 factors: dict[str, dict[str, np.ndarray]], ks=None, kinds=PROBES,
                 names: list[str] | None = None) -> pd.DataFrame:
    """For every modality and prefix length k: its own private factors and the shared factors decoded from
    its shared tokens (the first min(k, n_shared) registers), from its aligned shared embedding at k, and
    from its private tokens (registers n_shared..k−1, when k > n_shared). `encoded`: split ('fit', 'select',
    'test') → `encode_all` of that split; `factors`: split → factor table. The other modality's private factors
    are decoded too, as a sanity control only: that modality's sensor never sees them, so its tokens
    cannot know them (SynthTouch renders them bit-identically), whatever the model.

    One row per (modality, k, source, factor, probe); 'role' is 'own private' (leakage when the source is
    shared), 'shared' or 'other private (control)'. Representations that do not change with k (shared ones
    beyond n_shared, the causal mask guarantees it) are probed once and reported at every k. Each source is
    asked only what it is there to answer: shared tokens every role, the shared embedding its own private
    and the shared factors, the private tokens their own private factors. `names` limits the factors.
    """
    ks = prefix_ks(model, ks)
    n_shared = model.cfg.n_shared
    groups = {name: group for name, group in SynthTouch.factor_groups.items()
              if all(name in factors[split] for split in PROBE_SPLITS) and (names is None or name in names)}
    asks = {"shared tokens": ("own private", "shared", "other private (control)"),
            "shared embedding": ("own private", "shared"), "private tokens": ("own private",)}
    modalities = [m for m in model.cfg.modalities if m in ("vision", "touch")]
    role = {m: {name: "shared" if g == "shared" else "own private" if g == m else "other private (control)"
                for name, g in groups.items()} for m in modalities}
    at_k = {(m, k): [("shared tokens", min(k, n_shared)), ("shared embedding", min(k, n_shared))] +
            ([("private tokens", k)] if k > n_shared else []) for m in modalities for k in ks}
    keys = list(dict.fromkeys((m, *key) for (m, _), keys in at_k.items() for key in keys))
    jobs = [(dict(modality=m, source=source, j=j), kind, [n for n in groups if role[m][n] in asks[source]])
            for m, source, j in keys for kind in kinds]
    table = probe_table(jobs, lambda key: {split: source_rows(encoded[split][key["modality"]], key["source"], key["j"],
                                                              n_shared) for split in PROBE_SPLITS},
                        probe_targets(list(groups), factors), "leakage probes")
    parts = [table[(table.modality == m) & table.set_index(["source", "j"]).index.isin(keys_k)].assign(k=k)
             for (m, k), keys_k in at_k.items()]
    table = pd.concat(parts, ignore_index=True)
    table["role"] = [role[m][name] for m, name in zip(table.modality, table.factor)]
    columns = ["modality", "k", "source", "factor", "role", "probe", "score", "chance", "normalised"]
    return table[columns]


def leakage_summary(table: pd.DataFrame, probe: str = "non-linear") -> pd.DataFrame:
    """The headline: per modality and k, the worst (largest) normalised score of an own private factor from
    the shared tokens and from the shared embedding, beside the mean of the coarse shared factors and of the
    fine shared ones (SynthTouch.SCALE) from the same embedding, and of the own private factors from the
    private tokens (coarse and fine apart)."""
    t = table[table.probe == probe]
    scale = t.factor.map(SynthTouch.SCALE)

    def pick(source, role, how, size=None):
        part = t[(t.source == source) & (t.role == role) & ((scale == size) if size else True)]
        part = part[~part.factor.isin(list(SynthTouch.PHASE_PERIODS))]  # phases: instance identity, not a class
        return part.groupby(["modality", "k"]).normalised.agg(how)
    return pd.DataFrame({"leak into shared tokens (max)": pick("shared tokens", "own private", "max"),
                         "leak into shared embedding (max)": pick("shared embedding", "own private", "max"),
                         "shared factors from shared embedding (mean)": pick("shared embedding", "shared", "mean", "coarse"),
                         "fine shared from shared embedding (mean)": pick("shared embedding", "shared", "mean", "fine"),
                         "own private from private tokens (mean)": pick("private tokens", "own private", "mean", "coarse"),
                         "own fine private from private tokens (mean)": pick("private tokens", "own private", "mean",
                                                                               "fine")})


def leakage_columns(table: pd.DataFrame) -> pd.DataFrame:
    """`leakage_summary` of both probes as eval.json columns, one row per k: '<modality> <measure> [<probe>]'."""
    parts = []
    for probe in table.probe.unique():
        summary = leakage_summary(table, probe).unstack("modality")
        summary.columns = [f"{m} {measure} [{probe}]" for measure, m in summary.columns]
        parts.append(summary)
    return pd.concat(parts, axis=1)

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
