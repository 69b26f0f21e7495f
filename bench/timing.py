"""What every benchmark times with: CPU seconds of each side, the sides called in turn round after round (a busy
moment on a shared machine then hits all of them alike), and each ratio as its median over the rounds with the
smallest and largest round beside it, so a reader sees how far one run can be trusted.

CPU time (time.process_time: every thread of this process) is what a side costs whatever else the machine runs;
wall time swings with the load (a two-thread wall-clock benchmark read 6.9x on one run and 1.9x on the next).
Benchmarks fix the thread count (one unless threads are what they measure) so that CPU time is not spent
spinning in idle OpenMP workers.
"""
import statistics
import time
from typing import Callable

import torch


def add_arguments(parser, off: str, rounds: int = 3, threads: int = 1):
    """The options every benchmark takes; `off` says what --off switches off."""
    parser.add_argument("--threads", type=int, default=threads, help="torch threads, fixed so CPU time is comparable")
    parser.add_argument("--rounds", type=int, default=rounds, help="timed rounds, every side called once a round")
    parser.add_argument("--off", action="store_true",
                        help=f"switch the optimisation off ({off}): the ratio should then read about 1")


def start(args, timed: str = "CPU time"):
    """Fix the thread count and say what is timed, before any work."""
    torch.set_num_threads(args.threads)
    print(f"{timed}, {args.threads} thread(s) per process, {args.rounds} interleaved rounds"
          + ("; OPTIMISATION OFF (--off): both sides run the baseline" if args.off else ""))


def interleaved(sides: dict[str, Callable], rounds: int = 3, seconds: float = 0.0, warm_up: bool = True,
                clock: Callable[[], float] = time.process_time) -> tuple[dict[str, list[float]], dict[str, object]]:
    """({side: seconds of each round}, {side: what its last call returned}). With `warm_up` one untimed call each
    first (first-call allocations, lazy imports; a side that is a whole epoch skips it, its first round shows
    in the spread), then rounds of one call per side until at least `rounds` rounds and `seconds` of `clock`
    have passed."""
    out = {name: fn() for name, fn in sides.items()} if warm_up else {}
    times = {name: [] for name in sides}
    deadline = clock() + seconds
    while clock() < deadline or len(times[next(iter(sides))]) < rounds:
        for name, fn in sides.items():
            start = clock()
            out[name] = fn()
            times[name].append(clock() - start)
    return times, out


def ratio(slow: list[float], fast: list[float]) -> tuple[float, float, float]:
    """(median, min, max) over rounds of slow / fast, round by round: both sides of a round ran back to back,
    so their ratio is steadier than a ratio of medians."""
    ratios = [s / f for s, f in zip(slow, fast)]
    return statistics.median(ratios), min(ratios), max(ratios)


def spread(slow: list[float], fast: list[float]) -> str:
    """'1.53x (1.41-1.60 over 5 rounds)': the ratio as every benchmark prints it."""
    middle, low, high = ratio(slow, fast)
    return f"{middle:.2f}x ({low:.2f}-{high:.2f} over {len(slow)} rounds)"


def median_time(times: list[float]) -> str:
    """'61.5 ms' or '11.08 s': the median of one side's rounds."""
    middle = statistics.median(times)
    return f"{middle:.2f} s" if middle >= 1 else f"{middle * 1e3:.1f} ms"
