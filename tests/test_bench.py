"""The benchmarks can fail: each has a switch (`--off`) that turns its optimisation off, and with it both sides run
the baseline's code, so the ratio it prints reads about 1. These tests check the switch at tiny sizes by what
runs, never by how long it takes (timings on a shared machine would make them flaky); the ratio arithmetic is
checked with a made-up clock."""
import sys
from pathlib import Path

import pytest
import torch

import core
from conftest import make_mm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_cache  # noqa: E402
import bench_decoder  # noqa: E402
import bench_eval  # noqa: E402
import bench_generate  # noqa: E402
import bench_probes  # noqa: E402
import bench_scale  # noqa: E402
import bench_step  # noqa: E402
import timing  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_interleaved_calls_sides_in_turn_and_ratio_is_per_round():
    calls, now = [], [0.0]
    costs = {"slow": iter([9.0, 3.0, 2.0, 4.0]), "fast": iter([9.0, 1.0, 1.0, 1.0])}  # a warm-up call, then rounds

    def side(name):
        def run():
            calls.append(name)
            now[0] += next(costs[name])
            return name
        return run

    times, out = timing.interleaved({"slow": side("slow"), "fast": side("fast")}, rounds=3, clock=lambda: now[0])
    assert calls == ["slow", "fast"] * 4 and out == {"slow": "slow", "fast": "fast"}
    assert times == {"slow": [3.0, 2.0, 4.0], "fast": [1.0, 1.0, 1.0]}
    assert timing.ratio(times["slow"], times["fast"]) == (3.0, 2.0, 4.0)
    assert timing.spread(times["slow"], times["fast"]) == "3.00x (2.00-4.00 over 3 rounds)"
    # two sides that cost the same in each round read exactly 1, however much the cost moves from round to round
    costs = {"a": iter([5.0, 1.0, 7.0]), "b": iter([5.0, 1.0, 7.0])}
    times = timing.interleaved({"a": side("a"), "b": side("b")}, rounds=3, warm_up=False, clock=lambda: now[0])[0]
    assert timing.ratio(times["a"], times["b"]) == (1.0, 1.0, 1.0)


def test_generate_hook_sees_a_kv_cache_only_on_the_cached_sides_and_none_when_off(aligner, decoder_dir):
    mm = make_mm(aligner, decoder_dir, train_decoder="full").eval()
    # compare raises if the captions differ between the four sides or a side's cache use is not the expected one
    used = bench_generate.compare(mm, n=2, new_tokens=3, rounds=1, off=False, name="micro")
    assert used == {("cached", "batched"): True, ("cached", "per sample"): True,
                    ("uncached", "batched"): False, ("uncached", "per sample"): False}
    assert not any(bench_generate.compare(mm, n=2, new_tokens=3, rounds=1, off=True, name="micro").values())


def test_generate_uncached_loop_writes_what_generate_writes(aligner, decoder_dir):
    mm = make_mm(aligner, decoder_dir, train_decoder="full").eval()
    g = torch.Generator().manual_seed(1)
    tokens = {m: torch.randn(3, mm.n_registers, mm.aligner.model.design.token_width, generator=g) for m in mm.modalities}
    assert bench_generate.uncached_captions(mm, tokens, 4) == bench_generate.cached_captions(mm, tokens, 4)


def test_step_and_decoder_off_time_the_baseline_on_both_sides():
    torch.manual_seed(0)
    shape = (16, 6, 16, 4, 1, 2)
    plain = bench_step.PlainRegisters(*shape)
    joint, cross = core.RegisterTokenModule(*shape, "joint"), core.RegisterTokenModule(*shape, "cross")
    tokens, mask = torch.randn(2, 6, 16), torch.ones(2, 6, dtype=torch.bool)
    on = bench_step.sides(plain, joint, cross, tokens, mask, bf16=True)
    off = bench_step.sides(plain, joint, cross, tokens, mask, bf16=True, off=True)
    assert on["joint"] is not on["plain"] and on["joint bf16"] is not on["plain bf16"]
    assert off["joint"] is off["plain"] and off["joint bf16"] is off["plain bf16"]
    for step in off.values():
        step()

    decoder = core.FeatureDecoder(16, 8, 5, n_layers=1, n_heads=2)
    registers, keep = torch.randn(2, 4, 16, requires_grad=True), torch.ones(2, 4, dtype=torch.bool)
    assert bench_decoder.sides(decoder, registers, keep)["once"] is not bench_decoder.sides(decoder, registers, keep)["copies"]
    off = bench_decoder.sides(decoder, registers, keep, off=True)
    assert off["once"] is off["copies"]
    off["once"]()


def test_eval_cache_and_probes_off_run_the_baseline_on_both_sides(aligner):
    model = aligner.model.eval()
    off = bench_eval.sides(model, {}, off=True)
    assert off["one pass"] is off["pass per k"] and off["one pass"].keywords == {"one_pass": False}
    on = bench_eval.sides(model, {}, off=False)
    assert on["one pass"] is not on["pass per k"] and "one_pass" not in on["one pass"].keywords

    off = bench_cache.sides(None, {}, encode=print, off=True)
    assert off["cache"] is off["on the fly"] and off["cache"].args[1] is print
    assert bench_cache.sides(None, {}, encode=print)["cache"].args[1] is not print

    off = bench_probes.sides(model, {}, {}, processes=2, off=True)
    assert off["one"] is off["many"] and off["many"].keywords == {"processes": 1}
    assert bench_probes.sides(model, {}, {}, processes=2)["many"].keywords == {"processes": 2}


def test_scale_trains_an_epoch_from_disk_with_and_without_its_optimisations(tmp_path):
    bench_scale.write_cache(tmp_path, 8)
    for off in (False, True):
        result = bench_scale.train_from(tmp_path, False, epochs=1, batch=4, block=1 if off else 4, prefetch=not off,
                                        drop_each_epoch=True)
        assert result["samples"] == 8 and result["samples_per_s"] > 0 and result["peak_rss_gb"] > 0
