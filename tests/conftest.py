"""Fixtures shared by the test modules, and how `make test` spreads them over the cores (pytest-xdist)."""
import os

import pytest
import torch

import core
import data
import llm_integration as L
import phase1
import train
from encoders import create_encoder


# ----------------------------------------------------------------------------------------------
# make test: `pytest -n auto`, one pytest-xdist worker per core

WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:  # the cores are split among the workers: more threads per worker would only contend
    THREADS = max(1, (os.cpu_count() or 1) // WORKERS)
    torch.set_num_threads(THREADS)
    os.environ["OMP_NUM_THREADS"] = str(THREADS)  # and in what the tests start: notebook kernels, torchrun
# Modules whose tests share a run that a module fixture builds once: the notebooks, run one after another on
# one run folder (3.5 min at one thread), and the study's three tiny runs. Their tests stay on one worker;
# every other test goes to whichever worker is free.
ONE_WORKER = ("test_notebooks.py", "test_study.py")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedRunScheduling(LoadScopeScheduling):
        """Work units: a whole module of ONE_WORKER, else one test. xdist hands out the largest units first."""

        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module.rsplit("/", 1)[-1] in ONE_WORKER else nodeid

    return SharedRunScheduling(config, log)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: on a busy 2-core machine a second thread costs ~10× more than it gives.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
# phase 1: tiny SynthTouch runs through the real train.py

TINY = {"n_train": 128, "n_val": 32, "n_test": 64, "batch_size": 32, "epochs": 2, "warmup_steps": 2, "log_every": 1,
        "model.hidden_dim": 32, "model.n_registers": 4, "model.n_shared": 2, "model.n_layers": 1,
        "model.n_heads": 2, "model.embed_dim": 32, "leakage_probes": False}
STEPS_PER_EPOCH = TINY["n_train"] // TINY["batch_size"]
STEPS = STEPS_PER_EPOCH * TINY["epochs"]


def tiny(cache_dir, output_dir, **overrides) -> phase1.TrainConfig:
    return phase1.load_config(None, **{**TINY, "cache_dir": str(cache_dir), "output_dir": str(output_dir), **overrides})


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One feature cache for every tiny run (the first train() fills it)."""
    return tmp_path_factory.mktemp("features")


@pytest.fixture(scope="module")
def reference_run(one_thread, cache_dir, tmp_path_factory):
    """An uninterrupted 2-epoch run at one thread: the yardstick of interrupted and resumed runs."""
    return train.train(tiny(cache_dir, tmp_path_factory.mktemp("reference")))


# ----------------------------------------------------------------------------------------------
# phase 2: a random tiny aligner and a micro Qwen2 decoder

MICRO = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=128)


def micro_decoder(folder, pad_is_eos=False, chat_template=True, pad=True):
    """A micro Qwen2 + caption tokenizer in `folder`, optionally with a tokenizer variant."""
    L.save_tiny_decoder(folder, data.SynthTouch(300).captions + list(L.PROMPTS), vocab_size=300, **MICRO)
    if pad_is_eos or not pad:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokenizer.pad_token = tokenizer.eos_token if pad_is_eos else None
        tokenizer.save_pretrained(folder)
    if not chat_template:
        (folder / "chat_template.jinja").unlink()
    return str(folder)


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
    return micro_decoder(tmp_path_factory.mktemp("micro"))


@pytest.fixture(scope="module")
def aligner():
    cfg = core.ModelConfig(modalities=("vision", "touch"), hidden_dim=32, n_registers=8, n_shared=2, n_layers=1,
                           n_heads=2, embed_dim=32)
    encoders = {"vision": create_encoder("synth-vision"), "touch": create_encoder("synth-touch")}
    torch.manual_seed(0)
    model = core.AlignmentModel(cfg, {m: e.dim for m, e in encoders.items()},
                                {m: e.num_tokens for m, e in encoders.items()})
    return core.Aligner(encoders, model).eval()


# what the micro decoder's tests were sized with (LLMConfig's defaults before configs/phase2.yaml's became them):
# a linear projector on raw tokens, each batch in one chunk, the epochs they ask for
MICRO_SETTINGS = dict(projector="linear", standardize_tokens=False, length_chunks=1, min_steps=0)


def make_mm(aligner, decoder_dir, **cfg):
    torch.manual_seed(0)
    return L.MultimodalLLM(aligner, L.LLMConfig(model_name=decoder_dir, **{**MICRO_SETTINGS, **cfg}))
