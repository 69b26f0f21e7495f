"""The benchmarks can fail: each has a switch (`--off`) that turns its optimisation off, and with it both sides run
the baseline's code, so the ratio it prints reads about 1. These tests check the switch at tiny sizes by what
runs, never by how long it takes (timings on a shared machine would make them flaky); the ratio arithmetic is
checked with a made-up clock."""
import subprocess
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
        # waits for a CPU are part of the wall time, so leaving them out can only make the rate higher
        assert 0 <= result["cpu_wait_s"] < result["seconds"]
        assert result["samples_per_s_unwaited"] >= result["samples_per_s"]


def fake_proc(tmp_path, memory_in_v2: bool):
    """A fake /proc/self naming two memory hierarchies in tmp_path, a v1 one and a v2 one (whose controller the
    process's own group enables for its children only if memory_in_v2), this process's own group being
    "session" in both; each own group has its hierarchy's swap file, so a child group gets it written too."""
    own = {"v1": tmp_path / "memory" / "session", "v2": tmp_path / "unified" / "session"}
    for group in own.values():
        group.mkdir(parents=True)
    (own["v1"] / "memory.memsw.limit_in_bytes").write_text("9223372036854771712")
    (own["v2"] / "memory.swap.max").write_text("max")
    (own["v2"] / "cgroup.subtree_control").write_text("cpu memory" if memory_in_v2 else "cpu")
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "mounts").write_text(f"proc /proc proc rw 0 0\ncgroup {tmp_path / 'memory'} cgroup rw,relatime,memory 0 0\n"
                                 f"cgroup2 {tmp_path / 'unified'} cgroup2 rw,relatime 0 0\n")
    (proc / "cgroup").write_text("5:pids:/\n4:memory:/session\n0::/session\n")
    return proc, own


@pytest.mark.parametrize("files", [bench_scale.CGROUP_V2, bench_scale.CGROUP_V1], ids=["v2", "v1"])
def test_scale_runs_the_disk_side_alone_in_a_limited_child_cgroup_and_removes_it(tmp_path, files):
    proc, own = fake_proc(tmp_path, memory_in_v2=files is bench_scale.CGROUP_V2)  # v1 only where v2 cannot serve
    with pytest.raises(KeyboardInterrupt):
        with bench_scale.memory_limit(1_500_000_000, systemd_run="no-such-systemd-run", proc=proc) as limit:
            group = limit.group
            assert group.parent == own[files.version] and limit.files is files
            assert f"cgroup {files.version} memory controller" in limit.mechanism
            assert "not systemd-run --user: No such file or directory" in limit.mechanism
            assert (group / files.limit).read_text() == "1500000000"
            # v1's memsw limit counts memory and swap together, v2's swap.max swap alone: either way no swap
            assert (group / files.swap).read_text() == ("1500000000" if files is bench_scale.CGROUP_V1 else "0")
            child = subprocess.run(limit.prefix + [sys.executable, "-c", "import os; print(os.getpid())"],
                                   capture_output=True, text=True, check=True)
            assert (group / "cgroup.procs").read_text().split() == [child.stdout.strip()]  # the child, nothing else
            (group / files.peak).write_text("1499996160\n")
            assert limit.peak() == f"1.50 GB ({files.peak})"
            for control_file in group.iterdir():  # the kernel's vanish with their group; a fake group's do not
                control_file.unlink()
            raise KeyboardInterrupt  # Ctrl-C during the run
    assert not group.exists() and group.parent.exists()


def test_scale_drops_the_page_cache_each_epoch_where_no_limit_can_be_set(tmp_path):
    (tmp_path / "mounts").write_text("proc /proc proc rw 0 0\n")
    (tmp_path / "cgroup").write_text("0::/\n")
    with bench_scale.memory_limit(1_500_000_000, systemd_run="no-such-systemd-run", proc=tmp_path) as limit:
        assert limit.prefix == [] and limit.group is None and limit.peak() == ""
        assert limit.mechanism.startswith("no memory limit can be set here (systemd-run --user: No such file")
        assert "cgroup v2: no memory controller" in limit.mechanism and "posix_fadvise" in limit.mechanism
