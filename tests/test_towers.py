"""A training step's towers side by side (towers.py): on two threads each modality's tower runs in a thread of its own
and the step's loss and gradients are those of one thread; where a tower reads another modality's tokens, or one
thread is all there is, the towers run one after another in the calling thread."""
import threading

import pytest
import torch

import core
import towers
from features import Features


def model_and_batch(guard: str = "stopgrad", **cfg):
    torch.manual_seed(0)
    config = core.ModelConfig(modalities=("vision", "touch"), hidden_dim=32, n_registers=8, n_shared=2, n_layers=1,
                              n_heads=2, embed_dim=32, decoder_readout=16, encoder_readin=16, leakage_guard=guard,
                              alignment_weight=2.0, complementary_reg_weight=0.1, **cfg)
    model = core.AlignmentModel(config, {"vision": 24, "touch": 20}, {"vision": 6, "touch": 5}).train()
    batch = {m: Features(torch.randn(16, d), torch.randn(16, t, d), torch.ones(16, t, dtype=torch.bool))
             for m, (d, t) in {"vision": (24, 6), "touch": (20, 5)}.items()}
    return model, batch


def loss_and_grads(model, batch, threads: int, seen: list | None = None):
    """The step's loss and every gradient at `threads` threads; `seen` collects the thread each tower ran in."""
    design, kept = model.design, torch.get_num_threads()
    original = design.tower_terms
    if seen is not None:
        design.tower_terms = lambda *args: seen.append(threading.current_thread().name) or original(*args)
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(1)  # the same nested-dropout draws on both sides
        model.zero_grad(set_to_none=True)
        loss, _ = model(batch)
        loss.backward()
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(kept)
        design.tower_terms = original
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, after


def test_two_threads_run_each_tower_in_its_own_thread_with_one_threads_gradients():
    model, batch = model_and_batch()
    seen_one, seen_two = [], []
    loss_1, grads_1, _ = loss_and_grads(model, batch, 1, seen_one)
    loss_2, grads_2, after = loss_and_grads(model, batch, 2, seen_two)
    assert seen_one == ["MainThread"] * 2
    assert len(seen_two) == 2 and all(name.startswith("tower") for name in seen_two) and after == 2
    assert grads_2.keys() == grads_1.keys() and "logit_scale" in grads_2
    assert {n.split(".")[1] for n in grads_2 if n.startswith(("encoders.", "decoders."))} == {"vision", "touch"}
    # each tower computes on one thread, as the one-thread step does; only the losses across modalities run on two
    # threads, where a sum's order may change the last bits: float32's 1e-7 relative rounding, summed over a few
    # hundred terms at most, stays below 1e-5 (measured: equal to the bit)
    torch.testing.assert_close(loss_2, loss_1, rtol=1e-5, atol=1e-7)
    for name in grads_1:
        torch.testing.assert_close(grads_2[name], grads_1[name], rtol=1e-5, atol=1e-7, msg=name)


def test_towers_that_read_each_other_or_one_thread_run_one_after_another():
    model, batch = model_and_batch(guard="cross")  # the cross guard rebuilds vision from touch's shared tokens
    seen = []
    loss_and_grads(model, batch, 2, seen)
    assert seen == ["MainThread"] * 2
    kept = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert towers.side_by_side(2, torch.device("cpu")) and not towers.side_by_side(1, torch.device("cpu"))
        with torch.no_grad():  # evaluation: nothing to backpropagate
            assert not towers.side_by_side(2, torch.device("cpu"))
    finally:
        torch.set_num_threads(kept)
    model, batch = model_and_batch()
    seen = []
    loss_and_grads(model, batch, 1, seen)
    assert seen == ["MainThread"] * 2


def test_an_error_in_a_tower_is_raised_as_it_is_and_the_thread_count_comes_back():
    model, batch = model_and_batch()
    bad = dict(batch, touch=Features(torch.randn(16, 20), torch.randn(16, 4, 20), torch.ones(16, 4, dtype=torch.bool)))
    kept = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(ValueError, match=r"features are B×4×20 but this register module was built for B×5×20"):
            model(bad)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(kept)


def test_bench_towers_baseline_runs_the_towers_one_after_another():
    """bench/bench_towers.py's sides, by what runs: its baseline (and every side with --off) keeps the towers in the
    calling thread at two threads, its measured side runs them side by side."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_towers
    for side_by_side, expected in ((False, ["MainThread"] * 2), (True, ["tower"] * 2)):
        model, batch = model_and_batch()
        seen, original = [], model.design.tower_terms
        model.design.tower_terms = lambda *args: seen.append(threading.current_thread().name) or original(*args)
        kept = torch.get_num_threads()
        try:
            bench_towers.step_fn(model, 1, 2, side_by_side)(batch)
        finally:
            torch.set_num_threads(kept)
        assert [name.rstrip("_0123456789") for name in seen] == expected and towers.SIDE_BY_SIDE
