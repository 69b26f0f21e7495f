"""What each token knows, read by probes (probes.py): every factor from every single token and token group
(`information_map`, and its tables `group_summary`, `order_by_token`, `leakage`), and leakage by k, the private
factors a modality's shared tokens and shared embedding give away (`leakage_by_k`, `leakage_summary`, the eval.json
columns `leakage_columns`). Every probe is fit on the training split, tuned on validation, scored on test
(`PROBE_SPLITS`), many at once in worker processes (`fit_probes`).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

import alignment
import probes
from prefixes import Encoded, prefix_ks
from synthtouch import SynthTouch

GROUP_ORDER = ("shared", "vision", "touch")  # factor groups: who sees a factor


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
