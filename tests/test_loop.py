"""The one training loop's guarantees, proven by doing the damage: kill -9 in the middle of a slowed
checkpoint write, a NaN gradient on the last step of an epoch, a fresh run into a folder that holds a run,
a resume that cannot be exact, two processes building one feature cache; and the optimizer's rules.

Comparisons between an interrupted and an uninterrupted run are exact (torch.equal / ==) where both run
in this process at one thread: the same operations in the same order give the same bits. Where a run
happens in a child process, the child is also pinned to one thread, but the comparison allows a relative
1e-6: that is far below what a wrong batch, a replayed step or a lost optimizer state changes (those move
losses by 1e-3 or more on this tiny model), and it does not ask two processes to agree on bits.
"""
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import core
import data
import evaluate
import loop
import phase1
import run_folder
import train
from conftest import STEPS, STEPS_PER_EPOCH, TINY, tiny
from encoders import create_encoder
from features import Features, read_rows

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(train.__file__).resolve().parent
def rows(run_dir, kind=None):
    return [r for r in loop.RunFolder(run_dir).rows() if kind is None or r["kind"] == kind]


def step_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows(run_dir, "step")}


def assert_exactly_one_row_per_step_and_epoch(run_dir):
    assert [r["step"] for r in rows(run_dir, "step")] == list(range(1, STEPS + 1))
    assert [r["epoch"] for r in rows(run_dir, "epoch")] == list(range(TINY["epochs"]))


def final_weights(run_dir):
    return load_file(str(Path(run_dir) / "checkpoint" / "model.safetensors"))


# ----------------------------------------------------------------------------------------------
# kill -9 at random moments of a slowed checkpoint write

DRIVER = textwrap.dedent("""
    import json, sys, time
    import torch
    torch.set_num_threads(1)
    import safetensors.torch, loop, phase1, run_folder, train

    def slowly(fn):  # widen every stage of a checkpoint write, so a kill lands inside one
        def wrapped(*args, **kwargs):
            time.sleep(0.05)
            out = fn(*args, **kwargs)
            time.sleep(0.05)
            return out
        return wrapped

    save = loop.RunFolder.save
    def announced(self, step, *args):
        print("SAVE", step, flush=True)
        save(self, step, *args)
        print("SAVED", step, flush=True)
    loop.RunFolder.save = announced
    safetensors.torch.save_file = slowly(safetensors.torch.save_file)
    torch.save = slowly(torch.save)
    run_folder._fsync = slowly(run_folder._fsync)
    run_folder.os.replace = slowly(run_folder.os.replace)
    cfg = phase1.load_config(None, **json.loads(sys.argv[1]))
    train.train(cfg, resume=sys.argv[2] == "resume")
""")


def test_kill_9_during_checkpoint_writes_always_leaves_a_state_that_resumes_exactly(reference_run, cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    settings = {**TINY, "cache_dir": str(cache_dir), "output_dir": str(run_dir)}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    rng = random.Random(0)
    # each process is killed at a random moment of a checkpoint write, which takes about 0.7 s when slowed: the
    # first two inside their first write (early: half-written files; late: files complete, link perhaps not yet
    # swapped), the last inside a write made while a checkpoint already exists (its first write when it resumed
    # one, else its second), so a checkpoint surely exists when it lands
    for last, window in ((False, (0.0, 0.35)), (False, (0.35, 0.7)), (True, (0.0, 0.35))):
        mode = "resume" if loop.RunFolder(run_dir).checkpoint is not None else "fresh"
        nth_write = 2 if last and mode == "fresh" else 1
        errors = tmp_path / f"stderr-{last}-{window[0]}.txt"  # a file, not a pipe: tqdm's output would fill a pipe
        with open(errors, "w") as stderr:
            proc = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(settings), mode], env=env,
                                    stdout=subprocess.PIPE, stderr=stderr, text=True)
        writes = 0
        for line in proc.stdout:
            writes += line.startswith("SAVE ")
            if writes == nth_write:
                time.sleep(rng.uniform(*window))
                break
        assert writes == nth_write, ("the run ended before the checkpoint write the kill was meant for; its stderr "
                                     f"ends: {errors.read_text()[-2000:]}")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        run = loop.RunFolder(run_dir)
        if run.checkpoint is not None:  # whatever is on disk is one complete checkpoint
            run.load_weights()  # loads: not truncated
            assert run.load_state()["position"]["step"] == run.checkpoint_step()
    # the last kill came after a completed write: the run goes on from a checkpoint, not from the start, so a
    # resume that restored the schedule, the optimizer or the position wrongly would change the losses below
    assert loop.RunFolder(run_dir).checkpoint is not None
    train.train(tiny(cache_dir, run_dir), resume=True)
    assert_exactly_one_row_per_step_and_epoch(run_dir)
    np.testing.assert_allclose(list(step_losses(run_dir).values()), list(step_losses(reference_run).values()), rtol=1e-6)
    expected = final_weights(reference_run)
    for name, value in final_weights(run_dir).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-7, msg=name)
    leftovers = [p.name for p in run_dir.iterdir() if p.name.startswith(".") or p.name.startswith("checkpoint-")]
    assert leftovers == [f"checkpoint-{STEPS:08d}"]  # only the folder the link points at


# ----------------------------------------------------------------------------------------------
# non-finite updates are never saved

class NanGradient(torch.autograd.Function):
    """Identity forward (the loss stays finite), NaN backward: what an overflow in a backward pass does."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def nan_gradient_at(step, monkeypatch):
    original, calls = core.AlignmentModel.forward, []

    def forward(self, batch):
        loss, parts = original(self, batch)
        calls.append(1)
        return (NanGradient.apply(loss) if len(calls) == step else loss), parts
    monkeypatch.setattr(core.AlignmentModel, "forward", forward)


def test_nan_gradient_on_the_last_step_of_an_epoch_is_never_saved(reference_run, cache_dir, tmp_path, monkeypatch):
    cfg = tiny(cache_dir, tmp_path)
    with monkeypatch.context() as patch:
        nan_gradient_at(STEPS, patch)  # the last step of epoch 2, whose end would write a checkpoint
        with pytest.raises(loop.NonFiniteLoss, match=rf"gradient norm became nan at step {STEPS} \(epoch 1\).*"
                                                     rf"last good checkpoint \(step {STEPS_PER_EPOCH}\)"):
            train.train(cfg)
    run = loop.RunFolder(tmp_path)
    assert run.checkpoint_step() == STEPS_PER_EPOCH
    assert all(torch.isfinite(t).all() for t in run.load_weights().values())
    train.train(cfg, resume=True)  # the kept checkpoint is the good one: the run ends as if nothing happened
    assert step_losses(tmp_path) == step_losses(reference_run)
    assert_exactly_one_row_per_step_and_epoch(tmp_path)


def test_the_finiteness_check_finds_every_kind_of_non_finite_element():
    """It sums instead of masking: a NaN, a lone inf and an inf cancelled by a -inf in another tensor must each count,
    and finite weights far larger than a run trains must not."""
    def weights(**planted):
        tensors = [torch.full((1000,), 1e30), torch.randn(3, 4)]
        for where, value in planted.items():
            tensors[int(where[1])].view(-1)[7] = value
        return tensors
    assert loop._all_finite(weights())
    for planted in ({"t0": float("nan")}, {"t1": float("inf")}, {"t1": -float("inf")},
                    {"t0": float("inf"), "t1": -float("inf")}):
        assert not loop._all_finite(weights(**planted)), planted


def test_a_nan_before_the_first_checkpoint_says_nothing_is_kept(cache_dir, tmp_path, monkeypatch):
    nan_gradient_at(STEPS_PER_EPOCH, monkeypatch)
    with pytest.raises(loop.NonFiniteLoss, match="No checkpoint had been written yet.*nothing in .* is kept"):
        train.train(tiny(cache_dir, tmp_path))
    assert loop.RunFolder(tmp_path).checkpoint is None


def test_an_exploding_learning_rate_stops_before_anything_non_finite_is_saved(cache_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "MAX_LR", float("inf"))  # past the config's bound, to reach the guard behind it
    with pytest.raises(loop.NonFiniteLoss, match="became"):
        train.train(tiny(cache_dir, tmp_path, lr=1e6, warmup_steps=1))
    run = loop.RunFolder(tmp_path)
    assert run.checkpoint is None or all(torch.isfinite(t).all() for t in run.load_weights().values())


# ----------------------------------------------------------------------------------------------
# a run folder is never overwritten silently; resume is exact or refused

def test_a_fresh_run_into_a_folder_with_a_run_is_refused_and_overwrite_replaces_it(reference_run, cache_dir, tmp_path):
    before = (reference_run / "metrics.jsonl").read_text(), final_weights(reference_run)
    with pytest.raises(FileExistsError, match=rf"{reference_run} already holds a run.*--resume.*--output_dir.*--overwrite"):
        train.train(tiny(cache_dir, reference_run, lr=5e-4))
    assert (reference_run / "metrics.jsonl").read_text() == before[0]  # nothing touched
    assert all(torch.equal(v, before[1][k]) for k, v in final_weights(reference_run).items())
    copy = tmp_path / "copy"
    train.train(tiny(cache_dir, copy, epochs=1))
    train.train(tiny(cache_dir, copy, lr=5e-4, epochs=1), overwrite=True)
    assert phase1.load_config(copy / "config.yaml").lr == 5e-4
    assert [r["step"] for r in rows(copy, "step")] == list(range(1, STEPS_PER_EPOCH + 1))  # the old rows are gone


@pytest.mark.parametrize("how", ["cli", "ensure_trained"])
def test_resume_with_more_epochs_is_refused_the_same_way_everywhere(reference_run, cache_dir, how):
    cfg = tiny(cache_dir, reference_run, epochs=4)
    with pytest.raises(ValueError, match=r"'epochs': \(2, 4\).*schedule.*cannot be extended"):
        train.train(cfg, resume=True) if how == "cli" else train.ensure_trained(cfg)


def test_a_run_from_before_a_config_field_existed_is_still_reused(reference_run, cache_dir, tmp_path):
    """A field added later (with a default that keeps the old behaviour) must not orphan older runs."""
    old = tmp_path / "old"
    shutil.copytree(reference_run, old, symlinks=True)
    saved = yaml.safe_load((old / "config.yaml").read_text())
    del saved["model"]["token_dim"]
    (old / "config.yaml").write_text(yaml.safe_dump(saved))
    assert train.ensure_trained(tiny(cache_dir, old)) == old
    with pytest.raises(ValueError, match=r"'model.token_dim': \(None, 8\)"):
        train.ensure_trained(tiny(cache_dir, old, **{"model.token_dim": 8}))


def test_polling_a_run_reads_each_checkpoint_once(reference_run, tmp_path, monkeypatch):
    """make demo and a waiting ensure_trained ask `trained` every second while phase 1 trains beside them: the
    checkpoint's position is unpickled once per checkpoint, and a new checkpoint (a new folder) is read anew."""
    copy = tmp_path / "run"
    shutil.copytree(reference_run, copy, symlinks=True)
    run, reads, load = loop.RunFolder(copy), [], run_folder.load_state
    monkeypatch.setattr(run_folder, "load_state", lambda path, mmap=False: reads.append(path) or load(path, mmap))
    assert all(run.trained(TINY["epochs"]) for _ in range(5)) and not run.trained(TINY["epochs"] + 1)
    assert len(reads) == 1
    state = load(run.checkpoint / "state.pt")  # the next epoch's checkpoint, as save() writes it: a new folder
    state["position"]["epoch"] += 1
    newer = copy / "checkpoint-99999999"
    newer.mkdir()
    shutil.copy(run.checkpoint / "model.safetensors", newer)
    torch.save(state, newer / "state.pt")
    (copy / run_folder.CHECKPOINT).unlink()
    (copy / run_folder.CHECKPOINT).symlink_to(newer.name)
    assert run.trained(TINY["epochs"] + 1) and len(reads) == 2


def test_a_run_folder_is_trained_by_one_process_at_a_time(reference_run, cache_dir, tmp_path, capsys):
    """Notebook 04 beside notebook 02 (make demo), or two JupyterLab tabs, asking for one run: while another
    process holds the folder, ensure_trained waits for it instead of training the run a second time; with
    evaluated=False it returns as soon as the weights are final, not waiting for the test-split evaluation."""
    copy = tmp_path / "run"
    shutil.copytree(reference_run, copy, symlinks=True)
    (copy / "eval.json").unlink()  # trained: what the folder holds while the process that trained it evaluates
    cfg, holder = tiny(cache_dir, copy), loop.RunFolder(copy)
    assert holder.trained(TINY["epochs"]) and not holder.trained(TINY["epochs"] + 1)
    waiter = threading.Thread(target=train.ensure_trained, args=(cfg,))
    with holder.exclusive() as held:
        assert held
        assert train.ensure_trained(cfg, evaluated=False) == copy and not (copy / "eval.json").exists()
        waiter.start()  # needs the evaluation: waits for the holder
        waiter.join(3)
        assert waiter.is_alive() and not (copy / "eval.json").exists()
        assert f"another process is training {copy}; waiting for it" in capsys.readouterr().out
    waiter.join(120)
    assert not waiter.is_alive() and (copy / "eval.json").is_file()  # evaluated once the holder let go
    assert rows(copy, "epoch") == rows(reference_run, "epoch")  # from the same weights, nothing trained again
    files = [sorted(p.name for p in run.iterdir()) for run in (copy, reference_run)]
    assert files[0] == files[1]  # one checkpoint, no second run


def test_a_run_that_cannot_start_leaves_no_folder_for_its_lock(cache_dir, tmp_path):
    cfg = tiny(cache_dir, tmp_path / "never", batch_size=10 ** 6)
    with pytest.raises(ValueError, match="batch_size"):
        train.ensure_trained(cfg)
    assert not (tmp_path / "never").exists()


def test_interrupted_metrics_are_truncated_to_the_checkpoint_on_resume(reference_run, cache_dir, tmp_path):
    cfg = tiny(cache_dir, tmp_path)

    def interrupt(row):  # Ctrl-C after step 6, in the middle of epoch 2: steps 5-6 are logged but not saved
        if row["kind"] == "step" and row["step"] == 6:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg, callback=interrupt)
    # a kill -9 can also leave half a row at the end of the file
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "step", "step": 7, "lo')
    train.train(cfg, resume=True)
    assert_exactly_one_row_per_step_and_epoch(tmp_path)
    assert step_losses(tmp_path) == step_losses(reference_run)
    epoch = rows(tmp_path, "epoch")[1]
    assert epoch["train loss"] == pytest.approx(rows(reference_run, "epoch")[1]["train loss"], rel=1e-12)


def events(run_dir, folder=""):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    accumulator = EventAccumulator(str(Path(run_dir) / run_folder.TENSORBOARD / folder), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: {e.step: e.value for e in accumulator.Scalars(tag)} for tag in accumulator.Tags()["scalars"]}, \
        {tag: [e.step for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_tensorboard_shows_the_metrics_rows_and_each_step_once_after_a_resume(reference_run, cache_dir, tmp_path):
    """The run folder's TensorBoard events hold metrics.jsonl's rows (losses, learning rate, temperature per step;
    validation numbers per epoch) and eval.json's quality-vs-k table. A crash in epoch 2 leaves steps 5-6 logged
    after the checkpoint of epoch 1; the resumed run writes them again and TensorBoard purges the first writing,
    so every step shows once, with the value metrics.jsonl holds."""
    cfg = tiny(cache_dir, tmp_path)

    def crash(row):
        if row["kind"] == "step" and row["step"] == STEPS_PER_EPOCH + 2:
            raise RuntimeError("crash")
    with pytest.raises(RuntimeError, match="crash"):
        train.train(cfg, callback=crash)
    crashed = events(tmp_path)[1]["train/loss"]
    assert crashed[-1] == STEPS_PER_EPOCH + 2 and loop.RunFolder(tmp_path).checkpoint_step() == STEPS_PER_EPOCH
    train.train(cfg, resume=True)
    values, steps = events(tmp_path)
    for kind, group in (("step", "train"), ("epoch", "epoch")):
        for key in {k for row in rows(tmp_path, kind) for k in row} - {"kind", "step", "epoch"}:
            logged = {row["step"]: row[key] for row in rows(tmp_path, kind)}
            assert steps[f"{group}/{key}"] == sorted(logged), key  # each step once, in order
            assert values[f"{group}/{key}"] == pytest.approx(logged, rel=1e-6), key  # events keep float32
    assert {"train/loss", "train/lr", "train/temperature"} <= set(values)
    assert any(tag.startswith("epoch/val ") for tag in values)
    table = evaluate.read_eval(tmp_path / "eval.json")
    by_k, _ = events(tmp_path, "eval eval vs k")
    assert by_k["vision->touch R@1 pair"] == pytest.approx(table["vision->touch R@1 pair"].to_dict(), rel=1e-6)
    assert loop.RunFolder(tmp_path).foreign_entries() == []  # the events are the run's own


# ----------------------------------------------------------------------------------------------
# the optimizer's rules

def test_weight_decay_spares_registers_positions_queries_directions_temperature_biases_and_norms():
    cfg = core.ModelConfig(hidden_dim=32, n_registers=4, n_shared=2, n_layers=1, n_heads=2, embed_dim=16,
                           loss_type="combined")
    model = core.AlignmentModel(cfg, {"vision": 12, "touch": 12}, {"vision": 5, "touch": 5})
    opt, _ = loop.make_optimizer(model, 1e-3, 0.05, 10, 100)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in decayed}
    assert names and all(name.endswith(".weight") for name in names)
    for spared in ("encoders.vision.registers", "encoders.vision.feature_pos", "decoders.vision.queries",
                   "flow.direction.weight", "logit_scale", "encoders.vision.blocks.0.attn.q.bias",
                   "encoders.vision.norm.weight"):
        assert spared not in names, spared


def test_the_temperature_is_clamped_in_place_and_keeps_learning_at_the_bound():
    cfg = core.ModelConfig(hidden_dim=32, n_registers=4, n_shared=2, n_layers=1, n_heads=2, embed_dim=16,
                           nested_dropout="none", preservation_weight=0.0, init_temperature=0.005)
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(16, 5, 4, generator=g)
    batch = {m: Features(x.mean(1), x, torch.ones(16, 5, dtype=torch.bool))
             for m, x in ((m, latent @ torch.randn(4, 12, generator=g)) for m in ("vision", "touch"))}
    model = core.AlignmentModel(cfg, {"vision": 12, "touch": 12}, {"vision": 5, "touch": 5})
    model.after_optimizer_step()  # 1/0.005 = 200 > 100: clamped before the first step
    assert model.logit_scale.item() == pytest.approx(math.log(100))
    loss, parts = model(batch)
    loss.backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs() > 0  # not stuck at the bound
    assert parts["temperature"].item() == pytest.approx(0.01)  # the logged temperature is the one used


def test_each_torchrun_rank_draws_its_own_nested_dropout():
    draws = {}
    for rank in (0, 1):
        torch.manual_seed(loop.step_seed(0, rank, step=3))
        draws[rank] = core.NestedDropout(16, "uniform").train()(64).sum(1)
    assert not torch.equal(draws[0], draws[1])
    torch.manual_seed(loop.step_seed(0, 0, step=3))
    assert torch.equal(core.NestedDropout(16, "uniform").train()(64).sum(1), draws[0])  # and resumes the same



def check_start_worker(rank, store, cases, out_dir):
    """For each case, this rank checks the run folder the case names for it, then joins an all-reduce, as training's
    first step does; it writes what its check said."""
    os.environ.update(WORLD_SIZE="2", RANK=str(rank))
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        outcomes = []
        for folders in cases:
            try:
                loop.RunFolder(folders[rank], main=rank == 0).check_start({"lr": 0.1}, resume=False)
                outcomes.append("starts")
            except FileExistsError as err:
                outcomes.append(f"refused: {err}")
            torch.distributed.all_reduce(torch.ones(()))
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(outcomes))
    finally:
        torch.distributed.destroy_process_group()


def test_under_torchrun_rank_0_checks_the_run_folder_and_every_rank_does_what_it_found(tmp_path):
    """Rank 1 would read the folder while rank 0 writes it, and a refusal on one rank alone leaves the other waiting
    in its first all-reduce: every rank follows rank 0's check, whatever its own view of the folder (here another
    folder: one rank 0 would refuse, as it holds a file this project did not write)."""
    empty, foreign = tmp_path / "empty", tmp_path / "foreign"
    empty.mkdir()
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    cases = [(str(empty), str(foreign)), (str(foreign), str(empty))]
    torch.multiprocessing.spawn(check_start_worker, args=(str(tmp_path / "store"), cases, str(tmp_path)), nprocs=2)
    outcomes = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0] == "starts" and outcomes[0][1].startswith(f"refused: {foreign} is not empty")


def global_mean_worker(rank, store, out_dir):
    """Rank 0 holds 3 terms (1, 2, 3) of w·x, rank 1 one (10): the global batch's mean is 16/4 = 4, the mean of the
    ranks' means (2 + 10)/2 = 6."""
    os.environ.update(WORLD_SIZE="2", RANK=str(rank))
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        w = torch.ones((), requires_grad=True)
        terms = torch.tensor([[1.0, 2.0, 3.0], [10.0]][rank])
        loss = loop.Distributed().global_mean((w * terms).sum(), len(terms))
        loss.backward()
        torch.distributed.all_reduce(w.grad)  # what DDP does with every gradient: the ranks' average
        torch.save({"loss": loss.detach(), "grad": w.grad / 2}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_global_mean_weighs_every_term_of_the_global_batch_alike(tmp_path):
    """Phase 2's loss under torchrun: ranks holding different numbers of caption tokens still log, and step on, the
    mean over all of them, as one process with the whole batch does. Exact: a few small whole numbers."""
    torch.multiprocessing.spawn(global_mean_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result["loss"].item() == 4.0 and result["grad"].item() == 4.0
    assert loop.Distributed().global_mean(torch.tensor(16.0), 4).item() == 4.0  # one process: the plain mean


# ----------------------------------------------------------------------------------------------
# two processes building one feature cache

CACHE_DRIVER = textwrap.dedent("""
    import sys, numpy as np, torch
    torch.set_num_threads(1)
    import data
    from encoders import create_encoder
    feats = data.cached_features(create_encoder("synth-touch"), data.SynthTouch(48, seed=3, image_size=64),
                                 sys.argv[1], batch_size=8)
    np.save(sys.argv[2], np.asarray(feats.pooled))
""")


def test_two_processes_rebuilding_one_cache_both_get_it_whole(tmp_path):
    cache = tmp_path / "cache"
    reference = data.cached_features(create_encoder("synth-touch"), data.SynthTouch(48, seed=3, image_size=64),
                                     cache, batch_size=8)
    folder = next(p for p in cache.iterdir() if p.is_dir())
    (folder / "tokens.npy").write_bytes(b"damaged")  # both processes must rebuild it
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", CACHE_DRIVER, str(cache), str(tmp_path / f"out{i}.npy")],
                              env=env, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for proc in procs:
        assert proc.wait(timeout=240) == 0, proc.stderr.read()
    for i in range(2):  # the same encoder on the same images, at one thread in every process: a 1e-6 margin
        np.testing.assert_allclose(np.load(tmp_path / f"out{i}.npy"), np.asarray(reference.pooled), rtol=1e-6,
                                   atol=1e-6)
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == [folder.name]  # no .tmp / .old left


# ----------------------------------------------------------------------------------------------
# Reading a cache larger than memory: block-shuffled epochs, rows read with preadv, prefetching


def test_block_shuffled_epochs_are_permutations_read_block_by_block():
    n, batch, block = 1000, 16, 64
    order = loop.epoch_order(n, seed=3, epoch=2, block=block)
    assert sorted(order) == list(range(n))
    assert np.array_equal(order, loop.epoch_order(n, seed=3, epoch=2, block=block))  # resume sees the same
    assert not np.array_equal(order, loop.epoch_order(n, seed=3, epoch=3, block=block))
    assert np.array_equal(loop.epoch_order(n, 3, 2), np.random.default_rng([3, 2]).permutation(n))  # block 1: as before
    blocks = [set(b // block) for b in loop.index_batches(n, batch, 3, block)(2)]
    assert max(map(len, blocks)) <= 2  # the short last block shifts the batches after it by part of a batch
    assert set().union(*blocks) == set(range(-(-n // block)))  # every block visited
    whole = [set(b // block) for b in loop.index_batches(1024, batch, 3, block)(2)]
    assert all(len(b) == 1 for b in whole)  # blocks of whole batches: each batch reads one region of the file


def test_read_rows_of_a_memmap_equal_fancy_indexing(tmp_path):
    array = np.lib.format.open_memmap(tmp_path / "t.npy", "w+", np.float16, (50, 3, 4))
    array[:] = np.random.default_rng(0).standard_normal((50, 3, 4))
    array.flush()
    cached = np.load(tmp_path / "t.npy", mmap_mode="r")
    for index in ([0, 1, 2, 9, 10, 49], [7, 3, 3, 40], np.arange(50)[::-1]):
        assert np.array_equal(read_rows(cached, index), cached[np.asarray(index)])
    assert np.array_equal(read_rows(cached[10:], [0, 5]), cached[[10, 15]])  # a view is indexed as such


def test_prefetched_keeps_order_raises_errors_and_stops_early():
    assert list(loop.prefetched(range(10), lambda i: i * i)) == [i * i for i in range(10)]

    def fail_at_3(i):
        if i == 3:
            raise ValueError("unreadable batch 3")
        return i
    with pytest.raises(ValueError, match="batch 3"):
        list(loop.prefetched(range(10), fail_at_3))
    loaded = []
    items = loop.prefetched(range(1000), loaded.append)
    next(items), items.close()
    assert len(loaded) <= 4  # what was in flight, not the rest


def test_a_folder_that_is_not_a_run_is_never_written_into(tmp_path):
    """A fresh run into a folder holding what this project did not write (another tool's checkpoint-500/, a user's
    config.yaml, a run copied with its links dereferenced) is refused, with --overwrite too, and nothing in it is
    touched; what a run of ours leaves before its first checkpoint is ours, and a fresh start replaces it."""
    import phase1
    config = phase1.to_yaml(phase1.load_config(None))
    theirs = tmp_path / "theirs"
    (theirs / "checkpoint-500").mkdir(parents=True)
    (theirs / "checkpoint-500" / "pytorch_model.bin").write_bytes(b"weights")
    (theirs / "config.yaml").write_text("learning_rate: 3.0e-4\n")
    before = sorted((p.relative_to(theirs), p.read_bytes() if p.is_file() else None) for p in theirs.rglob("*"))
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=r"not a run of this kind: it holds \['checkpoint-500/', 'config.yaml'\]"):
            phase1.run_folder(theirs).start(config, resume=False, overwrite=overwrite)
    assert sorted((p.relative_to(theirs), p.read_bytes() if p.is_file() else None) for p in theirs.rglob("*")) == before
    ours = tmp_path / "ours"
    phase1.run_folder(ours).start(config, resume=False)
    (ours / "checkpoint-00000003").mkdir()
    (ours / "checkpoint-00000003" / "model.safetensors").write_bytes(b"")  # a save a crash cut short
    (ours / "checkpoint-00000004").mkdir()  # killed inside safetensors' save_file, which writes a temporary file
    (ours / "checkpoint-00000004" / ".tmpX3kQ9z").write_bytes(b"")  # beside the target and renames it (older saves)
    (ours / ".checkpoint-00000005.tmp4242").mkdir()  # the same kill today: the save's staging folder
    (ours / ".checkpoint-00000005.tmp4242" / ".tmpA8cd0F").write_bytes(b"")
    phase1.run_folder(ours).start(config, resume=False)
    assert sorted(p.name for p in ours.iterdir()) == ["config.yaml"]
    copied = tmp_path / "copied"  # cp -rL of a run: its checkpoint is a folder, not the link
    (copied / "checkpoint").mkdir(parents=True)
    (copied / "checkpoint" / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileExistsError, match=r"it holds \['checkpoint/'\]"):
        phase1.run_folder(copied).start(config, resume=False)


def test_the_checkpoint_link_names_a_complete_checkpoint_at_every_moment_of_a_save(reference_run, tmp_path,
                                                                                   monkeypatch):
    """A kill can land between any two file operations of a save: after each one, `checkpoint` must lead to a
    complete checkpoint (the old one, then the new). Writing the link in place (unlink, then symlink) fails here."""
    copy = tmp_path / "run"
    shutil.copytree(reference_run, copy, symlinks=True)
    run = loop.RunFolder(copy)
    weights, state, step = run.load_weights(), run.load_state(), run.checkpoint_step()
    seen = []

    def checked(fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            folder = loop.RunFolder(copy).checkpoint
            assert folder is not None and {p.name for p in folder.iterdir()} == run_folder.CHECKPOINT_FILES, \
                f"no complete checkpoint after {fn.__name__}{args}"
            seen.append((fn.__name__, loop.RunFolder(copy).checkpoint_step()))
            return out
        return wrapped

    for name in ("replace", "rename", "unlink", "symlink", "remove", "rmdir", "mkdir"):
        monkeypatch.setattr(run_folder.os, name, checked(getattr(os, name)))
    monkeypatch.setattr(run_folder.shutil, "rmtree", checked(shutil.rmtree))
    for name in ("unlink", "symlink_to", "mkdir", "rename", "replace"):
        monkeypatch.setattr(Path, name, checked(getattr(Path, name)))
    run.save(step + 1, weights, state)
    assert ("replace", step + 1) in seen and seen[-1][1] == step + 1  # the swap happened, and is what stays


def test_an_epoch_row_averages_its_steps_whether_or_not_a_thread_count_is_asked_each_step():
    """`threads()` is asked before every step (make demo's share of the cores); the epoch row still divides each
    running sum by the epoch's steps, so it is the mean of that epoch's step rows either way."""
    hp = type("HP", (), dict(epochs=1, lr=1e-2, weight_decay=0.0, warmup_steps=1, grad_clip=1.0, seed=0, log_every=1))
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    epochs = {}
    for threads in (None, torch.get_num_threads):
        model = torch.nn.Linear(2, 1)
        with torch.no_grad():
            model.weight.fill_(1.0), model.bias.fill_(0.5)
        rows = loop.fit(model, lambda i: ((model(x[i:i + 1]) ** 2).sum(), {}), lambda epoch: [0, 1, 2, 3], 4, hp,
                        threads=threads)
        steps, (epoch,) = [r["loss"] for r in rows if r["kind"] == "step"], [r for r in rows if r["kind"] == "epoch"]
        assert len(steps) == 4 and epoch["train loss"] == pytest.approx(sum(steps) / 4, rel=1e-12)
        epochs[threads] = epoch["train loss"]
    assert epochs[None] == pytest.approx(epochs[torch.get_num_threads], rel=1e-6)  # the same steps on any thread count


def test_the_thread_count_asked_each_step_reaches_numpy_blas_as_well():
    """make demo starts a notebook on one core and tells it two once another notebook ends: NumPy's BLAS (the
    end-of-training read-out solve, the probes) has to follow as torch does, else it keeps the count that
    OMP_NUM_THREADS gave it when the process started."""
    from threadpoolctl import threadpool_info, threadpool_limits
    hp = type("HP", (), dict(epochs=1, lr=1e-2, weight_decay=0.0, warmup_steps=1, grad_clip=1.0, seed=0, log_every=1))
    model, x, blas = torch.nn.Linear(2, 1), torch.randn(4, 2), []

    def loss(i):
        blas.append({pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"})
        return (model(x[i:i + 1]) ** 2).sum(), {}
    before = torch.get_num_threads()
    with threadpool_limits(1, user_api="blas"):  # as a process started on one core; restored on leaving
        torch.set_num_threads(1)
        try:
            loop.fit(model, loss, lambda epoch: [0, 1], 2, hp, threads=lambda: 2)
        finally:
            torch.set_num_threads(before)
    assert blas == [{2}, {2}]


def test_the_test_split_evaluation_computes_on_the_share_asked_when_it_runs(cache_dir, tmp_path, monkeypatch):
    """make demo starts notebook 04 beside 02's test-split evaluation once the weights are final, and tells 02 one
    thread from then on: the evaluation asks `threads()` as the steps do, so its probes fit in one process, not in
    as many as the last step's two threads (two probe processes beside 04 on two cores: the evaluation took 2.3
    minutes of make demo instead of 1.7)."""
    import information
    seen, asked = [], []
    fit_probes = information.fit_probes

    def recorded(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return fit_probes(*args, **kwargs)

    def threads():  # two while training, one after the last step, as make demo tells 02 once 04 starts
        asked.append(1)
        return 2 if len(asked) <= STEPS else 1
    monkeypatch.setattr(information, "fit_probes", recorded)
    before = torch.get_num_threads()
    try:
        train.train(tiny(cache_dir, tmp_path / "run", leakage_probes=True), threads=threads)
    finally:
        torch.set_num_threads(before)
    assert len(asked) > STEPS and seen and set(seen) == {1}


def test_a_phase_1_run_into_a_phase_2_folder_is_refused_naming_the_other_kind(tmp_path):
    """A phase-2 run's folder is no place for phase 1 (--overwrite too): the refusal says its config.yaml has keys
    phase 1's config has not (llm), as another kind of run's, and the phase-2 run is left as it was."""
    import phase1
    import phase2_run
    folder = tmp_path / "captions"
    phase2_run.run_folder(folder).start({"llm": {"epochs": 1}, "phase1_run": "runs/phase1/default"}, resume=False)
    with pytest.raises(FileExistsError, match=r"another kind of run's, phase 2's for a phase-1 run") as refused:
        phase1.run_folder(folder).start(phase1.to_yaml(phase1.load_config(None)), resume=False, overwrite=True)
    assert "llm" in str(refused.value) and (folder / "config.yaml").is_file()
