"""train.py on a tiny SynthTouch config: the run folder, exact resume after an interrupt, NaN stop,
config mismatch on resume, the seed command-line flags, and DDP (2 gloo processes = 1 process)."""
import collections
import inspect
import json
import os
import re
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

import core
import evaluate
import llm_integration as L
import loop
import phase1
import train
from conftest import STEPS, TINY, tiny
from encoders import create_encoder
from features import Features

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors run faster on one thread

ROOT = Path(train.__file__).resolve().parent
README = (ROOT / "README.md").read_text()
def rows(run_dir, kind):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row["kind"] == kind]


def step_losses(run_dir) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in rows(run_dir, "step")}


def test_train_writes_config_weights_metrics_and_eval(reference_run, cache_dir):
    names = {p.name for p in reference_run.iterdir()}
    assert {"config.yaml", "checkpoint", "metrics.jsonl", "eval.json"} <= names
    assert {p.name for p in (reference_run / "checkpoint").iterdir()} == {"model.safetensors", "state.pt"}
    saved = phase1.run_config(reference_run)
    assert saved == tiny(cache_dir, reference_run)  # its paths are absolute, as the fixtures give them
    assert [row["step"] for row in rows(reference_run, "step")] == list(range(1, STEPS + 1))
    epochs = rows(reference_run, "epoch")
    assert [row["epoch"] for row in epochs] == [0, 1]
    assert all(np.isfinite(row["train loss"]) and any(k.startswith("val ") for k in row) for row in epochs)
    assert epochs[1]["train loss"] < epochs[0]["train loss"]
    table = json.loads((reference_run / "eval.json").read_text())
    assert sorted(map(int, table)) == [1, 2, 4]  # every prefix length of 4 registers
    recalls = [v for row in table.values() for name, v in row.items() if "R@" in name and "chance" not in name]
    assert recalls and all(0 <= v <= 1 for v in recalls)
    with safe_open(str(reference_run / "checkpoint" / "model.safetensors"), "pt") as f:
        assert f.metadata()["step"] == str(STEPS)
    aligner = phase1.load_aligner(reference_run)
    assert not aligner.training and aligner.cfg == saved.model
    weights = load_file(str(reference_run / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(v, weights[k]) for k, v in aligner.model.state_dict().items())


def interrupt_at_epoch_end(monkeypatch):
    def callback(row):
        if row["kind"] == "epoch" and row["epoch"] == 0:
            raise KeyboardInterrupt
    return callback


def interrupt_after_step_6(monkeypatch):
    def callback(row):
        if row["kind"] == "step" and row["step"] == 6:
            raise KeyboardInterrupt
    return callback


def interrupt_inside_step_6(monkeypatch):
    """Ctrl-C lands in the middle of a forward pass, after nested dropout drew its random k."""
    original, calls = core.NestedDropout.forward, []
    model = phase1.load_config(None).model  # what tiny() trains: one draw a step per pair, or one per modality
    draws = 1 if model.nested_dropout_per_pair else len(model.modalities)

    def forward(self, *args, **kwargs):
        keep = original(self, *args, **kwargs)
        if self.training:
            calls.append(1)
            if len(calls) == 5 * draws + 1:  # the first draw of step 6
                raise KeyboardInterrupt
        return keep
    monkeypatch.setattr(core.NestedDropout, "forward", forward)


@pytest.mark.parametrize("interrupt", [interrupt_at_epoch_end, interrupt_after_step_6, interrupt_inside_step_6])
def test_interrupted_run_resumes_exactly_like_an_uninterrupted_one(reference_run, cache_dir, tmp_path,
                                                                   monkeypatch, interrupt, capsys):
    """Exact equality is the claim here and it is safe: both runs are in this process at one thread
    (the one_thread fixture), so they execute the same kernels in the same order."""
    cfg = tiny(cache_dir, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with monkeypatch.context() as patch:
            train.train(cfg, callback=interrupt(patch))
    assert "checkpoint saved" in capsys.readouterr().out
    assert (tmp_path / "checkpoint" / "state.pt").is_file() and not (tmp_path / "eval.json").exists()
    train.train(cfg, resume=True)
    assert [row["step"] for row in rows(tmp_path, "step")] == list(range(1, STEPS + 1))  # none twice or lost
    assert step_losses(tmp_path) == step_losses(reference_run)
    final = load_file(str(tmp_path / "checkpoint" / "model.safetensors"))
    expected = load_file(str(reference_run / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(reference_run, cache_dir, tmp_path, monkeypatch):
    original, calls = core.AlignmentModel.forward, []

    def forward(self, batch):
        loss, parts = original(self, batch)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 6 else loss), parts
    cfg = tiny(cache_dir, tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(core.AlignmentModel, "forward", forward)
        with pytest.raises(loop.NonFiniteLoss, match=r"loss became nan at step 6 \(epoch 1\).*last good checkpoint \(step 4\)"):
            train.train(cfg)
    state = loop.RunFolder(tmp_path).load_state()["position"]
    assert (state["step"], state["epoch"]) == (4, 1)  # the end of epoch 0
    aligner = phase1.load_aligner(tmp_path)
    assert all(torch.isfinite(p).all() for p in aligner.model.parameters())
    train.train(cfg, resume=True)  # and it is the good one: training goes on as if nothing happened
    assert step_losses(tmp_path) == step_losses(reference_run)


def test_cpu_bf16_runs_the_step_under_bf16_autocast(reference_run, cache_dir, tmp_path, monkeypatch):
    seen = []
    build = phase1.build_model

    def build_and_watch(cfg, feats=None):  # a hook on the model's first linear layer records its output dtype
        model = build(cfg, feats)
        first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
        first.register_forward_hook(lambda *args: seen.append(args[2].dtype))
        return model

    monkeypatch.setattr(phase1, "build_model", build_and_watch)
    # on a CPU without bf16 units it runs, and says once, before the first step, why it is slow and how to turn it off
    monkeypatch.setattr(loop, "cpu_has_bf16_units", lambda: False)
    with pytest.warns(UserWarning, match=r"no AVX-512 BF16 or AMX units.*Set cpu_bf16: false in the config") as caught:
        run = train.train(tiny(cache_dir, tmp_path / "bf16", cpu_bf16=True))
    assert sum("cpu_bf16" in str(w.message) for w in caught) == 1
    assert torch.bfloat16 in seen  # training steps (validation and evaluation run in float32)
    ours, reference = step_losses(run), step_losses(reference_run)
    # the same run in bf16: bf16 keeps 8 mantissa bits (relative rounding 2^-9 per operation), so after a few
    # steps losses drift apart by far more than float32 noise but stay near each other; 10% bounds it loosely
    assert ours.keys() == reference.keys() and all(np.isfinite(v) for v in ours.values())
    assert abs(ours[1] - reference[1]) < 0.1 * reference[1]


def test_bf16_units_are_read_off_the_cpu(reference_run, cache_dir, tmp_path, monkeypatch):
    """What the CPU reports decides the warning: the kernel's flags where it lists them (Linux), and a CPU with
    the units trains under bf16 autocast without a word."""
    flags = Path("/proc/cpuinfo")
    if flags.is_file():
        words = set(flags.read_text().split())
        assert loop.cpu_has_bf16_units() == bool(words & {"avx512_bf16", "amx_tile"})
    monkeypatch.setattr(loop, "cpu_has_bf16_units", lambda: True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train.train(tiny(cache_dir, tmp_path / "units", cpu_bf16=True, epochs=1))
    assert not [w for w in caught if "cpu_bf16" in str(w.message)]


def test_training_from_a_warm_feature_cache_builds_no_encoder(reference_run, cache_dir, tmp_path, monkeypatch):
    """Features cached, the model is sized from them: a process that trains never builds a frozen encoder
    (building one imports open_clip or timm, ~10 s of every train.py, torchrun rank and notebook kernel)."""
    import encoders
    monkeypatch.setattr(phase1, "_ENCODERS", {})
    monkeypatch.setattr(encoders, "create_encoder", lambda *a, **k: pytest.fail("built an encoder"))
    monkeypatch.setattr(phase1, "create_encoder", lambda *a, **k: pytest.fail("built an encoder"))
    run = train.train(tiny(cache_dir, tmp_path / "warm"))
    assert step_losses(run).keys() == step_losses(reference_run).keys()
    # and the model sized from the cache is the one sized from the encoders (the same shapes)
    cfg = tiny(cache_dir, tmp_path / "warm")
    _, feats = phase1.split_data(cfg, "train")
    monkeypatch.undo()
    from_cache, from_encoders = phase1.build_model(cfg, feats), phase1.build_model(cfg)
    assert [p.shape for p in from_cache.parameters()] == [p.shape for p in from_encoders.parameters()]


def test_a_loaded_run_builds_each_encoder_only_when_images_come_in(reference_run, cache_dir, monkeypatch):
    """load_aligner sizes the model from its checkpoint: reading tokens off cached features builds no encoder;
    the first images of a modality build that one encoder, and its embeddings are those of the eager aligner."""
    built = []
    monkeypatch.setattr(phase1, "_ENCODERS", {})
    monkeypatch.setattr(phase1, "create_encoder", lambda cfg: built.append(cfg.modality) or create_encoder(cfg))
    aligner = phase1.load_aligner(reference_run)
    cfg = phase1.load_config(reference_run / "config.yaml")
    test_set, feats = phase1.split_data(cfg, "test")
    tokens = aligner.model.tokens("vision", feats["vision"].batch(np.arange(4)))
    assert built == [] and tokens.shape[:2] == (4, cfg.model.n_registers)
    images = torch.stack([test_set[i]["vision"] for i in range(4)])
    lazy = aligner.embed("vision", images)
    assert built == ["vision"] and not aligner.encoders["vision"].training
    eager = core.Aligner({m: phase1.get_encoder(cfg, m) for m in cfg.model.modalities}, aligner.model).eval()
    torch.testing.assert_close(lazy, eager.embed("vision", images), rtol=0, atol=0)  # the same encoder object
    with pytest.raises(ValueError, match="no 'text' encoder"):
        aligner.encoder("text")


def test_an_adapter_run_is_sized_from_its_checkpoint_and_a_config_of_another_design_is_named(cache_dir, tmp_path,
                                                                                            monkeypatch):
    adapter = {"model.design": "adapter", "model.n_registers": 1, "model.n_shared": 1, "model.nested_dropout": "none",
               "model.preservation_weight": 0.0}
    run = train.train(tiny(cache_dir, tmp_path / "adapter", **adapter))
    built = []
    monkeypatch.setattr(phase1, "_ENCODERS", {})
    monkeypatch.setattr(phase1, "create_encoder", lambda cfg: built.append(cfg.modality) or create_encoder(cfg))
    assert phase1.load_aligner(run).cfg.design == "adapter" and built == []
    # config.yaml edited to another design: the weights are no register model's, and loading says what differs
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["model"].update(design="flextok", n_registers=4, n_shared=2)
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ValueError, match=r"config.yaml was edited after the run trained; \(trained with, now\): .*"
                                         r"'model.design': \('adapter', 'flextok'\).*restore_config\(\)"):
        phase1.load_aligner(run)


def test_resume_with_another_config_names_the_differences(reference_run, cache_dir):
    cfg = tiny(cache_dir, reference_run, lr=5e-4, **{"model.n_registers": 8})
    with pytest.raises(ValueError, match="another config") as err:
        train.train(cfg, resume=True)
    message = str(err.value)
    assert "'lr': (0.001, 0.0005)" in message and "'model.n_registers': (4, 8)" in message
    assert "n_shared" not in message  # only what differs


def test_resume_without_a_checkpoint_says_so(cache_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train.train(tiny(cache_dir, tmp_path), resume=True)


# ----------------------------------------------------------------------------------------------
# The seed command lines


def test_flextok_seed_flags_map_to_the_config(tmp_path):
    cfg, mode = train.parse_args([
        "--stage1_checkpoint", "ckpt/stage1.pth", "--datasets_dir", str(tmp_path), "--output_dir", "out",
        "--log_name", "run7", "--epochs", "3", "--batch_size", "16", "--n_registers", "16", "--n_shared", "4",
        "--loss_type", "combined", "--flow_weight", "0.25"])
    assert mode == train.RunMode(resume=False, overwrite=False)
    assert (cfg.dataset, cfg.datasets_dir) == ("tvl", str(tmp_path))
    # architecture and image size come from the checkpoint itself (tests/test_real_data.py)
    assert cfg.encoders["touch"] == {"name": "tvl-touch-vit-tiny", "weights": "ckpt/stage1.pth"}
    assert (cfg.output_dir, cfg.log_name, cfg.run_dir) == ("out", "run7", Path("out/run7"))
    assert (cfg.epochs, cfg.batch_size) == (3, 16)
    m = cfg.model
    assert (m.n_registers, m.n_shared, m.loss_type, m.flow_weight) == (16, 4, "combined", 0.25)


SEED_002 = ["--num_register_tokens", "4", "--num_overlapping_tokens", "3", "--nested_dropout_rate", "0.5",
            "--complementary_reg_weight", "0.01"]  # seeds 002/003's command line, with train.py for its script


def test_the_seed_002_command_line_is_refused_with_the_flags_that_train_fluxtalk():
    """Its flags are FluxTalk's; on the default flextok design nested_dropout_rate would do nothing. Refused, naming
    what trains FluxTalk; with either, it is FluxTalk's model that trains."""
    with pytest.raises(SystemExit, match=r"--nested_dropout_rate and --complementary_reg_weight are flags of the "
                                         r"FluxTalk design.*flextok design with power_of_two.*--config "
                                         r"configs/fluxtalk.yaml.*--design fluxtalk"):
        train.parse_args(SEED_002)
    cfg, _ = train.parse_args(["--config", "configs/fluxtalk.yaml", *SEED_002, "--resume"])
    m = cfg.model
    assert (m.design, m.attention, m.nested_dropout) == ("fluxtalk", "cross", "linear")
    assert (m.n_registers, m.n_shared, m.nested_dropout_rate, m.complementary_reg_weight) == (4, 3, 0.5, 0.01)
    cfg, _ = train.parse_args(["--design", "fluxtalk", *SEED_002])
    assert cfg.dataset == "synthtouch" and cfg.model == m.__class__(**{
        **phase1.design_on_testbed("fluxtalk").model.__dict__, "n_registers": 4, "n_shared": 3})
    # a key where its design does not use it is refused too, named with the setting it needs
    with pytest.raises(SystemExit, match=r"model.nested_dropout_rate=0.3 does nothing with model.nested_dropout: "
                                         r"power_of_two.*--set model.nested_dropout=linear"):
        train.parse_args(["--set", "model.nested_dropout_rate=0.3"])


def test_every_row_of_the_readmes_seed_table_runs(cache_dir, tmp_path):
    """README "Coming from the seed code": the seeds' scripts are train.py, their register module's names import
    from core, and their test_modules.py is tests/test_core.py."""
    table = README.split("## Coming from the seed code")[1].split("\n## ")[0]
    rows = [line.split("|")[1:3] for line in table.splitlines() if line.startswith("| `")]
    assert len(rows) == 4
    # experiments/stage2/train.py and main_train_stage2.py: seed 002/003's line + --design fluxtalk trains FluxTalk
    sizes = [f"{k}={v}" for k, v in TINY.items() if k not in ("model.n_registers", "model.n_shared")]
    train.main(["--design", "fluxtalk", *SEED_002, "--output_dir", str(tmp_path / "flux"), "--set",
                f"cache_dir={cache_dir}", *sizes])
    model = phase1.load_aligner(tmp_path / "flux").model
    assert model.cfg.design == "fluxtalk" and model.n_tokens == 4 and isinstance(model.design, core.FluxTalkDesign)
    # from experiments.stage2.cursor.register_tokens import ...: the same names from core
    line = re.search(r"`(from core import [^`]+)`", table).group(1)
    names = {}
    exec(line, names)
    assert {"RegisterTokenModule", "NestedDropout", "RegisterTokenLoss"} <= set(names)
    feats = {m: Features(torch.randn(8, 12), torch.randn(8, 5, 12), torch.ones(8, 5, dtype=torch.bool))
             for m in ("vision", "touch")}
    aligner = core.AlignmentModel(core.ModelConfig(hidden_dim=16, n_registers=4, n_shared=2, n_layers=1, n_heads=2,
                                                   embed_dim=8, complementary_reg_weight=0.01), {"vision": 12, "touch": 12},
                                  {"vision": 5, "touch": 5}).eval()  # eval: no nested dropout, so two calls agree
    loss, parts = names["RegisterTokenLoss"](aligner)(feats)
    assert loss.item() == aligner(feats)[0].item() and {"contrastive", "complementary"} <= set(parts)
    # test_modules.py: tests/test_core.py, run as the row says
    command = re.search(r"`(\.venv/bin/python -m pytest tests/test_core.py[^`]*)`", table).group(1)
    done = subprocess.run([sys.executable, *command.split()[1:], "-q", "-p", "no:cacheprovider", "-k", "prefix_lengths"],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-2000:]


def test_cli_without_flags_is_the_default_config_and_set_reaches_any_field():
    assert train.parse_args([])[0] == phase1.load_config(None)
    cfg, mode = train.parse_args(["--config", str(ROOT / "configs" / "default.yaml"), "--resume",
                                    "--set", "model.hidden_dim=64", "n_train=100", "model.modalities=[vision, text]"])
    assert mode.resume and cfg.model.hidden_dim == 64 and cfg.n_train == 100 and cfg.model.modalities == ("vision", "text")
    # a dotted key reaches into every nested section, a mapping too: the other encoders keep their defaults
    cfg, _ = train.parse_args(["--set", "encoders.vision={name: synth-vision, weights: w.safetensors}"])
    assert cfg.encoders == {**phase1.load_config(None).encoders,
                            "vision": {"name": "synth-vision", "weights": "w.safetensors"}}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        train.parse_args(["--set", "hidden_dim"])
    with pytest.raises(ValueError, match=r"unknown config keys \['n_trian'\]"):
        train.parse_args(["--set", "n_trian=5"])
    with pytest.raises(ValueError, match=r"unknown loss_type 'clip'"):
        train.parse_args(["--loss_type", "clip"])


def test_datasets_dir_without_data_fails_clearly(cache_dir, tmp_path):
    empty = tmp_path / "tvl"
    empty.mkdir()
    cfg, _ = train.parse_args(["--datasets_dir", str(empty), "--output_dir", str(tmp_path / "out"),
                               "--set", f"cache_dir={cache_dir}"])
    with pytest.raises(FileNotFoundError, match=f"no TVL train.csv with rows found under {empty}.*ssvtp"):
        train.train(cfg)
    assert not (tmp_path / "out").exists()


def test_missing_stage1_checkpoint_fails_clearly(tmp_path):
    cfg, _ = train.parse_args(["--stage1_checkpoint", str(tmp_path / "stage1.pth")])
    with pytest.raises(FileNotFoundError, match="stage1.pth.*does not exist"):
        phase1.get_encoder(cfg, "touch")


@pytest.mark.parametrize("script", [train, L])
def test_every_flag_of_both_command_lines_says_its_meaning_and_default(script, capsys):
    """--help of train.py and llm_integration.py: every config flag names its key, its default and, where the key
    has a fixed set of values, the choices; every other flag has help text and argparse's default."""
    with pytest.raises(SystemExit):
        (script.parse_args if script is train else script.main)(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    for name, flag in script.FLAGS.items():
        assert re.search(rf"--{name} \w+ .+? \(config key {re.escape(flag.key)}; default .+? from configs/", text), name
        if flag.choices:
            assert f"one of {', '.join(flag.choices)}" in text
    assert "--set [KEY=VALUE ...] any config key" in text
    assert "--max_new_tokens" in text or script is train


def test_the_finished_run_prints_retrieval_by_k_not_a_cut_file(reference_run):
    summary = train.eval_summary(reference_run / "eval.json")
    table = evaluate.read_eval(reference_run / "eval.json")
    assert f"every metric at every k: {reference_run / 'eval.json'}" in summary
    header = summary.splitlines()[1].split()
    assert header == ["k", *map(str, table.index)]  # one column per k, every number whole
    row = next(line for line in summary.splitlines() if line.startswith("vision->touch R@1 pair "))
    assert [float(x) for x in row.split()[-len(table):]] == pytest.approx(table["vision->touch R@1 pair"].tolist(), abs=5e-4)


# ----------------------------------------------------------------------------------------------
# Distributed: N processes with batch B/N are one process with batch B


DDP_MODEL = core.ModelConfig(design="flextok", hidden_dim=32, n_registers=4, n_shared=2, n_layers=1, n_heads=2,
                             embed_dim=16, nested_dropout="none", mrl_dims=(8,), preservation_weight=0.5)


def ddp_batch(n=16, width=12, tokens=5):
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(n, tokens, 4, generator=g)
    out = {}
    for m in DDP_MODEL.modalities:
        x = latent @ torch.randn(4, width, generator=g) + 0.1 * torch.randn(n, tokens, width, generator=g)
        out[m] = Features(x.mean(1), x, torch.ones(n, tokens, dtype=torch.bool))
    return out


def ddp_model():
    torch.manual_seed(0)
    batch = ddp_batch()
    return core.AlignmentModel(DDP_MODEL, {m: f.tokens.shape[-1] for m, f in batch.items()},
                               {m: f.tokens.shape[1] for m, f in batch.items()})


def loss_and_grads(model, batch, rank=0, world=1):
    per = len(batch["vision"].pooled) // world
    local = {m: Features(*(a[rank * per:(rank + 1) * per] for a in f)) for m, f in batch.items()}
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    loss, parts = wrapped(local)
    loss.backward()  # DDP averages the gradients over ranks here
    return {"loss": loss.detach(), "contrastive": parts["contrastive"].detach(),
            "grads": {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}}


def ddp_worker(rank, world, store, out_dir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.save(loss_and_grads(ddp_model(), ddp_batch(), rank, world), Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_processes_with_half_batches_give_the_loss_and_gradients_of_one(tmp_path):
    single = loss_and_grads(ddp_model(), ddp_batch())
    torch.multiprocessing.spawn(ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for rank in ranks:  # negatives gathered: each rank's contrastive loss is the full batch's
        torch.testing.assert_close(rank["contrastive"], single["contrastive"], atol=1e-5, rtol=1e-5)
    # the preservation part is a per-rank mean, so the ranks' losses average to the single loss
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, single["loss"], atol=1e-5, rtol=1e-5)
    assert ranks[0]["grads"].keys() == single["grads"].keys()
    for name, grad in single["grads"].items():
        torch.testing.assert_close(ranks[0]["grads"][name], grad, atol=1e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(ranks[1]["grads"][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_torchrun_two_processes_train_like_one(tmp_path):
    """The seed command line `torchrun --nproc_per_node=2 train.py ...` trains what one process does,
    starting from an empty feature cache (which the ranks must not fill at the same time)."""
    settings = {**TINY, "epochs": 1, "model.nested_dropout": "none", "model.preservation_weight": 0.0,
                "cache_dir": str(tmp_path / "features")}
    flags = ["--set", *(f"{k}={v}" for k, v in settings.items())]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    ddp_dir = tmp_path / "ddp"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(ROOT / "train.py"), "--output_dir", str(ddp_dir), *flags],
                   cwd=tmp_path, env=env, check=True, capture_output=True, timeout=300)
    single_dir = train.train(phase1.load_config(None, **settings, output_dir=str(tmp_path / "single")))
    # Two ranks sum each gradient in another order than one process (all-reduce of half batches), so they
    # agree to rounding, ~1e-7 relative in float32. AdamW divides by sqrt(v): a parameter whose gradient were
    # only rounding noise (as a key bias was, before keys lost their bias) would step ±lr by the noise's
    # sign, which no tolerance can cover; every remaining parameter has a real gradient, so after 2 steps
    # at lr 1e-3 the weights agree to well within 1e-4.
    ddp_losses, single_losses = step_losses(ddp_dir), step_losses(single_dir)
    assert ddp_losses.keys() == single_losses.keys() == set(range(1, STEPS // 2 + 1))
    np.testing.assert_allclose(list(ddp_losses.values()), list(single_losses.values()), rtol=1e-5)
    ddp_weights = load_file(str(ddp_dir / "checkpoint" / "model.safetensors"))
    single_weights = load_file(str(single_dir / "checkpoint" / "model.safetensors"))
    for name, value in single_weights.items():
        torch.testing.assert_close(ddp_weights[name], value, atol=1e-4, rtol=1e-4, msg=name)
    assert yaml.safe_load((ddp_dir / "config.yaml").read_text())["batch_size"] == 32


def test_a_command_line_walks_to_its_checkpoint_through_phase1_and_loop_once_each(cache_dir, tmp_path):
    """Read top-down: train.py asks phase1.py for its config (load_config: the flags' defaults, then the config) and
    for everything the config builds (`prepared`), then hands it to loop.fit, which starts, trains and checkpoints
    the run folder. Every call a frame of train.py makes into those files is counted (sys.settrace, every thread;
    a `with` block once, through contextlib; a property counts), so a walk that climbs back up again fails here."""
    calls = collections.Counter()
    entered = set()  # a `with` block's generator is entered once and resumed on leaving: one call
    counted = {phase1.__file__: "phase1.py", loop.__file__: "loop.py"}
    project = os.path.dirname(train.__file__)

    def caller(frame):
        frame = frame.f_back
        while frame is not None and not frame.f_code.co_filename.startswith(project):  # the standard library
            frame = frame.f_back
        return frame and frame.f_code.co_filename

    def trace(frame, event, arg):  # called on every Python call only; returns None: no line-by-line tracing
        callee = counted.get(frame.f_code.co_filename)
        if callee and frame not in entered and caller(frame) == train.__file__:
            if frame.f_code.co_flags & inspect.CO_GENERATOR:
                entered.add(frame)
            calls[callee, frame.f_code.co_name] += 1

    sizes = [f"{key}={value}" for key, value in {**TINY, "epochs": 1, "cache_dir": str(cache_dir)}.items()]
    threading.settrace(trace)
    sys.settrace(trace)
    try:
        train.main(["--output_dir", str(tmp_path / "walk"), "--set", *sizes])
    finally:
        sys.settrace(None)
        threading.settrace(None)
    assert loop.RunFolder(tmp_path / "walk").trained(1)
    assert calls == {("phase1.py", "load_config"): 2, ("phase1.py", "prepared"): 1, ("loop.py", "fit"): 1}
