"""A phase-2 run folder: what its config.yaml holds and meant when older (`run_folder`), what may change on resume
(`RESUME_IGNORES`), the phase-1 weights it was trained on (`check_phase1_weights`), and what `MultimodalLLM.load`
reads back from it (`saved_run`)."""
from __future__ import annotations

import os

import alignment
import loop
import phase1
from llm_config import LLMConfig


# What a config.yaml saved before a field existed meant by its absence, where the default is now another: these
# fields came with defaults that kept runs as they were, before configs/phase2.yaml's values became LLMConfig's
BEFORE_FIELD = {"standardize_tokens": False, "length_chunks": 1, "cpu_threads": 0, "min_steps": 0}
RETIRED = ("cache_dir",)  # fields older runs saved that no longer mean anything (built-in decoders live in the run)


def run_folder(path, main: bool = True) -> loop.RunFolder:
    """A phase-2 run folder; its config.yaml is compared field by field, missing fields read as they meant then.
    Beside llm it holds what MultimodalLLM.run_config and run_phase2 add; they are its keys too, so its config.yaml
    reads as a phase-2 run's own and --overwrite may replace the run. `main`: whether this process writes it (rank 0
    of a torchrun job)."""
    return loop.RunFolder(path, main, defaults={"llm": {**LLMConfig().to_dict(), **BEFORE_FIELD, **dict.fromkeys(RETIRED)},
                                                **dict.fromkeys(("decoder_hidden_size", "phase1_run", "phase1_weights",
                                                                 "phase1_tensors"))})


# what may differ when a phase-2 run is resumed: generation settings and where things live; the phase-1 weights'
# identity is `check_phase1_weights`'s and `check_phase1_tensors`'s (a run saved before they were recorded has none)
RESUME_IGNORES = ("llm.log_every", "llm.max_new_tokens", "llm.local_files_only", "llm.cpu_threads", "phase1_weights",
                  "phase1_tensors")


def check_phase1_tensors(run: loop.RunFolder, aligner: alignment.Aligner):
    """Refuse a phase-1 model in memory (MultimodalLLM.load's `aligner`) whose tensors are not those the phase-2 run
    was trained on. The file's sha256 (`check_phase1_weights`) cannot be compared with weights that have no file,
    so a run records the tensors' own digest too (a run saved before it did is not checked)."""
    saved = run.saved_config().get("phase1_tensors")
    now = loop.tensors_digest(aligner.model.state_dict())
    if saved is not None and saved != now:
        raise ValueError(f"the aligner given to MultimodalLLM.load is not the phase-1 model the phase-2 run {run.path} "
                         f"was trained on: its tensors are sha256 {now[:16]}…, the run recorded {saved[:16]}… "
                         "(another phase-1 run, one retrained since, or a copy changed in memory: cast to another "
                         "dtype, trained further). Pass the one it was trained on (MultimodalLLM.load(RUN) loads "
                         f"its own phase-1 run, {run.saved_config().get('phase1_run')}), or train phase 2 again on "
                         "this one")


def check_phase1_weights(run: loop.RunFolder, phase1_run: str | os.PathLike, digest: str):
    """Refuse a phase-2 run whose phase-1 run's weights (sha256 `digest` now) are not the ones it was trained on:
    its projector would read tokens it never saw (the phase-1 run was retrained or replaced since)."""
    saved = run.saved_config().get("phase1_weights") if run.config_path.is_file() else None
    if saved is not None and saved != digest:
        raise ValueError(f"the phase-2 run {run.path} was trained on the phase-1 run {phase1_run} when its weights "
                         f"were sha256 {saved[:16]}…, but they are now {digest[:16]}…: that run was retrained or "
                         "replaced since, and this projector never saw its tokens. Train phase 2 again (--overwrite, or "
                         "a new --output_dir), or restore the phase-1 run's weights")


def saved_run(run_dir: str | os.PathLike, aligner: alignment.Aligner | None = None
              ) -> tuple[loop.RunFolder, LLMConfig, alignment.Aligner]:
    """A trained phase-2 run's folder, its config, and `aligner` or, when None, its phase-1 run's (found relative to
    this one, as config.yaml keeps it); either is refused when its weights are not those the run was trained on."""
    run = run_folder(run_dir)
    if not run.config_path.is_file():
        raise FileNotFoundError(f"{run.path} is not a phase-2 run folder (no config.yaml in it); pass the "
                                "--output_dir of a finished llm_integration.py run, e.g. runs/phase2/default")
    saved = run.saved_config()
    if aligner is None:
        phase1_run = phase1.from_run(saved["phase1_run"], run.path)
        check_phase1_weights(run, phase1_run, phase1.finished_weights(phase1_run))
        aligner = phase1.load_aligner(phase1_run)
    check_phase1_tensors(run, aligner)
    llm = LLMConfig(**{k: v for k, v in saved["llm"].items() if k not in RETIRED})
    return run, llm, aligner
