"""A phase-2 run end to end: trained on a phase-1 run's training split and evaluated (`run_phase2`, `ensure_phase2`),
and the statistics over seeds and settings (`seed_statistics`, `ABLATIONS`)."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

import information
import loop
import phase1
from caption_eval import (EVAL_FILES, add_probe_ceiling, caption_eval_sources, eval_file, evaluate_captions,
                          probe_ceilings, split_factors)
from captioner import MultimodalLLM
from captions import attribute_baselines
from config import atomic_write
from llm_config import LLMConfig, ROOT
from phase2_run import RESUME_IGNORES, check_phase1_weights, run_folder
from phase2_train import encode_tokens, fit_captioner
from token_sources import IMAGE_MODALITIES


# The validation runs that chose configs/phase2.yaml's settings (default phase-1 model, seed 0): every evaluated
# token source of each setting, caption accuracy beside its probe ceiling (notebook 04 draws them)
VALIDATION_REFERENCE = ROOT / "docs" / "phase2" / "validation_ablation.csv"


def run_phase2(phase1_run: str | os.PathLike, output_dir: str | os.PathLike, llm_cfg: LLMConfig | None = None,
               resume: bool = False, callback=None, overwrite: bool = False, split: str = "test",
               threads=None) -> dict:
    """Train phase 2 on a phase-1 run's training split (the validation split's numbers logged after every
    epoch) and evaluate on `split`: "val" to choose settings and epochs, "test" only to report them. Writes
    caption_eval.json (test) or caption_eval_val.json; on SynthTouch every row also holds the linear-probe
    ceiling of its very tokens ("probe accuracy ..." keys, `add_probe_ceiling`). `threads()`: the threads it may
    compute on (make demo's share; None: torch's count); on the CPU its steps take at most `llm_cfg.cpu_threads`."""
    phase1_run, output_dir, result_file = Path(phase1_run), Path(output_dir), eval_file(output_dir, split)
    llm_cfg = on_phase1_run(llm_cfg or LLMConfig(), phase1_run)
    dist = loop.Distributed()  # under torchrun, before anything goes to a GPU: it picks this rank's device
    phase1_weights = phase1.finished_weights(phase1_run)  # an unfinished run is refused here
    check_not_phase1_run(output_dir, phase1_run)
    if resume:
        check_phase1_weights(run_folder(output_dir), phase1_run, phase1_weights)
    outside = torch.get_num_threads()
    given = threads or (lambda: outside)
    cap = llm_cfg.cpu_threads if phase1.core_device().type == "cpu" else 0
    capped = (lambda: min(cap, given())) if cap else given
    torch.set_num_threads(capped())
    try:
        aligner = phase1.load_aligner(phase1_run).to(phase1.core_device())
        cfg = phase1.run_config(phase1_run)
        with dist.main_first():  # rank 0 fills a missing feature cache: no two ranks write one cache folder
            train_set, train_feats = phase1.split_data(cfg, "train")
            val_set, val_feats = phase1.split_data(cfg, "val")
        if split == "val" and val_set is None:
            raise ValueError(f"the phase-1 run {phase1_run} has no validation split to evaluate on; use "
                             "split='test' (--split test) or add a val.csv to its dataset")
        train_tokens = encode_tokens(aligner.model, train_feats)
        val = (None if val_set is None else
               (encode_tokens(aligner.model, val_feats), val_set.captions, split_factors(val_set)))
        torch.manual_seed(llm_cfg.seed)  # the projector's and a built-in decoder's initial weights
        mm = MultimodalLLM(aligner, llm_cfg)
        fit_captioner(mm, train_tokens, train_set.captions, output_dir, resume=resume, callback=callback,
                      extra={"phase1_run": phase1.to_run(phase1_run, output_dir), "phase1_weights": phase1_weights},
                      overwrite=overwrite, val=val, threads=capped)
        if dist.world > 1:
            torch.distributed.destroy_process_group()
        if not dist.main:  # rank 0 evaluates and writes; the other ranks of a torchrun job are done
            return {}
        if not resume:  # a replaced run's evaluations are stale, whichever split they were of
            for name in EVAL_FILES.values():
                (output_dir / name).unlink(missing_ok=True)
        if split == "val":
            eval_set, eval_tokens = val_set, val[0]
        else:
            eval_set, eval_feats = phase1.split_data(cfg, "test")
            eval_tokens = encode_tokens(aligner.model, eval_feats)
        factors = split_factors(eval_set)
        sources, fit_ceilings = caption_eval_sources(mm), None
        if factors is not None:  # SynthTouch: beside every row, the linear-probe ceiling of its tokens
            train_factors = split_factors(train_set)
            weights = loop.RunFolder(phase1_run).checkpoint / "model.safetensors"
            cache = CEILINGS.setdefault((str(weights.resolve()), weights.stat().st_mtime_ns, split), {})
            fit_ceilings = functools.partial(probe_ceilings, mm, sources, train_tokens, train_factors, eval_tokens,
                                             factors, cache)
        captioned = threading.Event()

        def ceilings_beside():  # once a second core is there, if it comes before the captions are done
            while given() < 2:
                if captioned.wait(1.0):
                    return None
            return fit_ceilings()
        with ThreadPoolExecutor(1) as beside:
            # the ceilings read phase-1 tokens only: with a spare core their probes run while this thread captions,
            # 19 s beside 19 s. In make demo the core often frees up while the captions run (notebook 03 ends)
            early = beside.submit(ceilings_beside) if fit_ceilings else None
            try:
                result = evaluate_captions(mm, eval_tokens, eval_set.captions, factors)
            finally:
                captioned.set()
        if fit_ceilings is not None:
            ceilings = early.result()
            add_probe_ceiling(result["rows"], sources, ceilings if ceilings is not None else fit_ceilings())
            result["baselines"] = attribute_baselines(train_factors, factors)
        result.update(split=split, phase1_run=str(phase1_run), llm=mm.llm_cfg.to_dict())
        atomic_write(result_file, lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
        return result
    finally:
        torch.set_num_threads(outside)


def check_not_phase1_run(output_dir: Path, phase1_run: Path):
    """Refuse an output_dir that holds a phase-1 run (say the one phase 2 reads, given twice by a slip): phase 2
    writes a run folder of its own, and --overwrite never replaces another kind of run."""
    if (output_dir / "config.yaml").is_file() and phase1.run_folder(output_dir).own_config():
        which = "the phase-1 run --phase1_run names" if output_dir.resolve() == phase1_run.resolve() else "a phase-1 run"
        raise FileExistsError(f"output_dir {output_dir} holds {which}: phase 2 writes a run folder of its own and never into a phase-1 run's, "
                              "--overwrite included; nothing in it was touched. Choose a new --output_dir, e.g. "
                              f"--output_dir {output_dir.parent / (output_dir.name + '-phase2')}")


def on_phase1_run(llm_cfg: LLMConfig, phase1_run: str | os.PathLike) -> LLMConfig:
    """`llm_cfg` with its token source's modalities, where it leaves them open, those of the phase-1 run's model that
    are images (a vision+text run has no touch tokens to caption from), so its run folder says which it used."""
    if llm_cfg.source.modalities is not None:
        return llm_cfg
    folder = phase1.run_folder(phase1_run)
    has = folder.saved_config()["model"]["modalities"] if folder.config_path.is_file() else IMAGE_MODALITIES
    source = dataclasses.replace(llm_cfg.source, modalities=tuple(m for m in IMAGE_MODALITIES if m in has))
    return dataclasses.replace(llm_cfg, source=source)


def ensure_phase2(phase1_run: str | os.PathLike, output_dir: str | os.PathLike, llm_cfg: LLMConfig,
                  callback=None, split: str = "test", threads=None) -> dict:
    """The evaluation on `split` of `output_dir` (caption_eval.json for test), training only what is missing:
    a finished run of the same config is reused, an interrupted one resumes, otherwise phase 2 starts.
    Re-running a notebook costs nothing."""
    llm_cfg = on_phase1_run(llm_cfg, phase1_run)
    run = run_folder(output_dir)
    if run.checkpoint is None:
        return run_phase2(phase1_run, output_dir, llm_cfg, callback=callback, split=split, threads=threads)
    check_phase1_weights(run, phase1_run, phase1.finished_weights(phase1_run))
    saved = run.saved_config()
    run.check_same_config({"llm": llm_cfg.to_dict(), "decoder_hidden_size": saved.get("decoder_hidden_size"),
                           "phase1_run": phase1.to_run(phase1_run, output_dir)}, RESUME_IGNORES)
    done = eval_file(run.path, split)
    if done.is_file():
        result = json.loads(done.read_text())
        # max_new_tokens may differ on resume; captions generated with another limit are evaluated again (unset, it is
        # the one the run fixed from its captions)
        if llm_cfg.max_new_tokens in (None, result["llm"]["max_new_tokens"]):
            return result
    return run_phase2(phase1_run, output_dir, llm_cfg, resume=True, callback=callback, split=split, threads=threads)


# probe ceilings already computed in this process, per (phase-1 weights file, its modification time, split)
CEILINGS: dict[tuple, dict] = {}


# What the ablation changes on top of configs/phase2.yaml, one suspect at a time: where information is lost between
# the tokens and the captions (`--seeds 0 --ablation --split val`; chosen on val only).
ABLATIONS = {
    "raw tokens": {"standardize_tokens": False},  # the setting before the validation runs chose whitened tokens
    "channels standardised": {"standardize_tokens": True},  # the setting before whitening (with 60 epochs)
    "decoder 4 layers, width 256": {"model_name": "synthtouch-qwen2-small"},
    "no source mixing": {"mix_sources": False},
    "linear projector": {"projector": "linear"},
    "lr 3e-3": {"lr": 3e-3},  # the setting before the validation ablation chose 1e-3
    "20 epochs": {"epochs": 20},  # the validation runs chose 12 (10 fell short, more costs time)
}


def seed_statistics(phase1_run: str | os.PathLike, output_dir: str | os.PathLike, settings: dict[str, LLMConfig],
                    seeds=(0, 1, 2), split: str = "test") -> pd.DataFrame:
    """Each setting trained once per seed (in output_dir/<setting>/seed<s>; finished runs are reused) and
    evaluated on `split`. One row per (setting, token source): the mean and std over seeds of every
    attribute accuracy and of its probe ceiling, with the majority baseline; written to
    output_dir/phase2_<split>.csv, and the targets of each setting (`target_summary`) to phase2_<split>.json."""
    output_dir = Path(output_dir)
    repeated = sorted({seed for seed in seeds if list(seeds).count(seed) > 1})
    if repeated:  # one run, counted twice, would shrink the std
        raise ValueError(f"seeds {list(seeds)} name {repeated} more than once: a seed trains one run, and a repeated "
                         "one would count twice in the mean ± std; give distinct seeds, e.g. --seeds 0 1 2")
    frames, baselines = [], None
    for name, llm_cfg in settings.items():
        for seed in tqdm(seeds, desc=f"phase 2 · {name} · seeds", leave=False):
            run = output_dir / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") / f"seed{seed}"
            result = ensure_phase2(phase1_run, run, dataclasses.replace(llm_cfg, seed=seed), split=split)
            rows = pd.DataFrame(result["rows"]).drop(columns=["examples", "per adjective"], errors="ignore")
            frames.append(rows.assign(setting=name, seed=seed))
            baselines = result.get("baselines", {}).get("majority", {})  # SynthTouch only
    runs = pd.concat(frames, ignore_index=True)
    numbers = [c for c in runs.columns if c.startswith(("accuracy", "probe accuracy", "caption accuracy"))
               or c in ("bleu4", "cider_d")]
    table = runs.groupby(["setting", "modalities", "k"], sort=False)[numbers].agg(["mean", "std"])
    table.columns = [f"{c} {stat}" for c, stat in table.columns]
    table = table.reset_index().assign(**{f"majority {k}": v for k, v in baselines.items() if k in numbers})
    atomic_write(output_dir / f"phase2_{split}.csv", lambda tmp: table.to_csv(tmp, index=False))
    summary = {name: target_summary(part) if baselines else {}  # the targets are about SynthTouch attributes
               for name, part in table.groupby("setting", sort=False)}
    summary = {"split": split, "seeds": list(seeds), "phase1_run": str(phase1_run), "settings": summary}
    atomic_write(output_dir / f"phase2_{split}.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=1)))
    return table


def target_summary(table: pd.DataFrame) -> dict[str, float]:
    """The numbers the phase-2 targets are stated in, from one setting's rows of `seed_statistics`: from all
    tokens of every modality, each group's mean accuracy, its std over seeds and its share of the probe
    ceiling; at every k, the largest shortfall of the private groups below their ceiling; and the controls
    (no tokens; one modality's tokens) next to the majority baseline of the groups they cannot know."""
    both = max(table.modalities, key=lambda m: (m != "none", m.count("+")))
    full = table[table.modalities == both].sort_values("k")
    last = full.iloc[-1]
    out = {"source": f"{both} k={int(last.k)}", "accuracy": last["accuracy mean"], "accuracy std": last["accuracy std"]}
    for group in information.GROUP_ORDER:
        column = f"accuracy {group}"
        out.update({column: last[f"{column} mean"], f"{column} std": last[f"{column} std"],
                    f"{column} / probe": last[f"{column} mean"] / last[f"probe {column} mean"]})
        if group != "shared":
            gaps = full[full.k > 0][f"probe {column} mean"] - full[full.k > 0][f"{column} mean"]
            out[f"{column} worst shortfall below probe over k"] = float(gaps.max())
    # the controls: what no tokens, or one modality's tokens, say about what they cannot know
    for source, column in (("none", "accuracy"), ("vision", "accuracy touch"), ("touch", "accuracy vision")):
        rows = table[table.modalities == source].sort_values("k")
        if len(rows):
            out[f"control {source}: {column}"] = rows.iloc[-1][f"{column} mean"]
            out[f"control {source}: majority {column}"] = rows.iloc[-1][f"majority {column}"]
    return {k: float(v) if isinstance(v, (float, np.floating)) else v for k, v in out.items()}
