"""The preservation decoder's read-out solved in closed form (readout_fit.py): after solving, the decoder reads
from the first k tokens what a ridge read-out of the same tokens reads, and a run's checkpoint holds the solution."""
import numpy as np
import pytest
import torch

import evaluate
import loop
import phase1
import prefixes
import train
from conftest import tiny
from features import Features
import readout_fit
from readout_fit import solve_readouts
from test_core import build, paired_features, small

pytestmark = pytest.mark.usefixtures("one_thread")


def split(features: dict[str, Features], rows) -> dict[str, Features]:
    return {m: Features(*(t[rows] for t in f)) for m, f in features.items()}


def decoder_and_ridge(model, splits, ks):
    """Per k: the decoder's test preservation cosine and a ridge read-out's from the same tokens (evaluate's)."""
    tokens = {name: prefixes.encode_all(model, f, ks, reconstruct=False)["vision"].tokens for name, f in splits.items()}
    ridge = evaluate.readout_cosine(tokens, {name: f["vision"] for name, f in splits.items()}, ks)
    test = splits["test"]["vision"]
    decoder = model.reconstruction_cosine("vision", tokens["test"], test, ks, test.mean_token())
    return {k: float(decoder[k].mean()) for k in ks}, ridge


def test_a_solved_read_out_reads_what_a_ridge_read_out_of_the_same_tokens_reads():
    """Untrained registers over features that are linear views of a latent: the decoder's random read-out reads
    nothing (the failure case the measurement must show), the solved one what the ridge reads. Rank 128 ≥ k·16
    numbers, so the rank cuts nothing, and both fit the same 300 rows with strengths from one grid; they may differ
    by the attention part, which the solve keeps where it helps on the validation rows and which then moves the
    test cosine by a few hundredths at most (0.03)."""
    cfg = small(hidden_dim=16, decoder_readout=128, decoder_readout_solved=True, n_registers=8, n_shared=2)
    model = build(cfg).eval()
    data = paired_features(600)
    splits = {"fit": split(data, slice(0, 300)), "select": split(data, slice(300, 400)),
              "test": split(data, slice(400, 600))}
    ks = cfg.prefix_lengths
    before, ridge = decoder_and_ridge(model, splits, ks)
    assert all(before[k] < ridge[k] - 0.2 for k in ks), (before, ridge)
    solve_readouts(model, splits["fit"], splits["select"])
    after, ridge_after = decoder_and_ridge(model, splits, ks)
    assert ridge_after == pytest.approx(ridge)  # the tokens are untouched
    assert all(after[k] > ridge[k] - 0.03 for k in ks), (after, ridge)


def test_the_modalities_solved_side_by_side_get_the_maps_solved_one_after_another():
    """With two threads each modality solves in a thread of its own on one thread: the same operations as the
    solve on one thread, so the same read-out up to the summation order of float32 products. The maps are compared
    by what they output (a reduced-rank map's factors are fixed only up to the signs of its directions): within
    1e-4 of the outputs' largest value, where a product's rounding is a relative 1e-6. Torch's and BLAS's thread
    counts are as they were afterwards."""
    from threadpoolctl import threadpool_info
    cfg = small(hidden_dim=16, decoder_readout=128, decoder_readout_solved=True, n_registers=8, n_shared=2)
    data = paired_features(400)
    fit, select = split(data, slice(0, 300)), split(data, slice(300, 400))
    outputs = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            model = build(cfg).eval()
            blas = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
            solve_readouts(model, fit, select)
            assert torch.get_num_threads() == threads
            assert [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"] == blas
            encoded = prefixes.encode_all(model, select, cfg.prefix_lengths, reconstruct=False)
            with torch.no_grad():
                outputs[threads] = {(m, g): solved(encoded[m].tokens.flatten(1)) for m, decoder in model.decoders.items()
                                    for g, solved in enumerate(decoder.solved)}
        finally:
            torch.set_num_threads(1)
    assert {m for m, _ in outputs[1]} == {"vision", "touch"} and outputs[1].keys() == outputs[2].keys()
    for key, value in outputs[1].items():
        assert torch.allclose(outputs[2][key], value, rtol=0, atol=1e-4 * value.abs().max().item()), key


def test_the_products_sliced_from_all_tokens_solve_each_k_as_its_own_products_do(monkeypatch):
    """A prefix's standardised rows are the first k·hidden columns of all tokens' rows, so the solve computes the
    fit rows' products with the targets once and slices them; forced to compute them at each k instead (products
    None, as where the rows are fewer than the columns), it reaches the same maps: within 1e-4 of the outputs'
    largest value, where the two differ by the rounding of float32 sums (a relative 1e-6), and the grid's strengths
    are far enough apart that rounding picks the same one. Both solve in the primal form here (300 rows, 128
    columns)."""
    cfg = small(hidden_dim=16, decoder_readout=128, decoder_readout_solved=True, n_registers=8, n_shared=2)
    data = paired_features(400)
    fit, select = split(data, slice(0, 300)), split(data, slice(300, 400))
    made = readout_fit.TokenRows.__init__

    def without_products(self, *args):
        made(self, *args)
        self.products = None

    outputs = {}
    for sliced in (True, False):
        if not sliced:
            monkeypatch.setattr(readout_fit.TokenRows, "__init__", without_products)
        model = build(cfg).eval()
        solve_readouts(model, fit, select)
        encoded = prefixes.encode_all(model, select, cfg.prefix_lengths, reconstruct=False)
        keep = {k: (torch.arange(cfg.n_registers) < k).expand(100, -1) for k in cfg.prefix_lengths}
        with torch.no_grad():
            outputs[sliced] = {(m, k): decoder(encoded[m].tokens, keep[k]) for m, decoder in model.decoders.items()
                               for k in cfg.prefix_lengths}
    for key, value in outputs[True].items():
        assert torch.allclose(outputs[False][key], value, rtol=0, atol=1e-4 * value.abs().max().item()), key


def test_a_run_with_a_solved_read_out_saves_the_solution(cache_dir, tmp_path, monkeypatch):
    """Solving the loaded run's read-out again changes nothing: the last checkpoint holds the solved maps (to float32
    rounding of a least-squares solve, relative 1e-3 of the weights' scale) and each map's attention weight; the
    checkpoints written while training hold the one trained map, not the grid's."""
    cfg = tiny(cache_dir, tmp_path / "run", **{"model.decoder_readout": 16, "model.decoder_readout_solved": True})
    saves, save = [], loop.RunFolder.save
    monkeypatch.setattr(loop.RunFolder, "save", lambda self, step, tensors, state: (
        saves.append(sum(".solved." in name for name in tensors)), save(self, step, tensors, state))[-1])
    run = train.train(cfg)
    assert saves[:-1] == [0] * (cfg.epochs - 1) and saves[-1] == 4 * len(cfg.model.prefix_lengths) * 2
    model = phase1.load_aligner(run).model
    saved = {name: p.clone() for name, p in model.decoders.named_parameters() if ".solved." in name}
    weights = {m: decoder.attention_weight.clone() for m, decoder in model.decoders.items()}
    assert len(saved) == 4 * len(cfg.model.prefix_lengths) * len(cfg.model.modalities)
    _, train_feats = phase1.split_data(cfg, "train")
    _, val_feats = phase1.split_data(cfg, "val")
    solve_readouts(model, train_feats, val_feats)
    for name, p in model.decoders.named_parameters():
        if name in saved:
            scale = saved[name].abs().max().clamp(min=1e-6)
            torch.testing.assert_close(p / scale, saved[name] / scale, atol=1e-3, rtol=0)
    for m, decoder in model.decoders.items():  # the weight on the attention part, chosen by the solve, is saved too
        assert torch.equal(decoder.attention_weight, weights[m])


def test_a_checkpoint_from_when_the_per_k_maps_were_trained_loads_as_solved():
    """Runs saved before the per-k maps became fitted tensors hold them as `readout.<g>.*` and no map trained for
    every k: they load with those maps as the solved ones, the decoder reading exactly what it read."""
    cfg = small(hidden_dim=16, decoder_readout=8, decoder_readout_solved=True, n_registers=8, n_shared=2)
    torch.manual_seed(0)
    model = build(cfg).eval()
    for decoder in model.decoders.values():
        decoder.make_solved_maps()
        with torch.no_grad():
            for p in decoder.solved.parameters():
                p.normal_(std=0.1)
    old = {name.replace(".solved.", ".readout.", 1): value for name, value in loop.checkpoint_tensors(model).items()
           if ".readout." not in name}
    fresh = build(cfg).eval()
    loaded = fresh.complete_state(dict(old))
    own = loop.checkpoint_tensors(fresh)
    assert sorted(loaded) == sorted(own)
    with torch.no_grad():
        for name, value in loaded.items():
            own[name].copy_(value)
    registers, keep = torch.randn(5, 8, 16), torch.arange(8)[None] < torch.tensor([1, 2, 3, 5, 8])[:, None]
    with torch.no_grad():
        torch.testing.assert_close(fresh.decoders["vision"](registers, keep), model.decoders["vision"](registers, keep))
