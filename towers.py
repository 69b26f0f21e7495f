"""Each modality's tower side by side: on a CPU with several threads, a training step runs every modality's part
(its register module, embedding head and preservation decoder, forward and backward) in a thread of its own, on
one core each. Those parts share no weights and meet only in the losses that compare modalities.

A phase-1 step's products are small (64 samples × 80 tokens × 128 wide) and split badly over two threads; one tower
per core runs them whole (bench/bench_towers.py times both against one thread). Each tower computes as on one
thread, so a step's gradients are one thread's, up to the order of the sums in the losses across modalities.

`run` keeps the step's graph whole for the loop that calls `loss.backward()`: what it returns enters the rest of the
loss through `_Join`, whose backward sends each tower its gradients and backpropagates the towers side by side."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

_POOL: ThreadPoolExecutor | None = None
SIDE_BY_SIDE = True  # bench/bench_towers.py switches it off for its baseline


def side_by_side(n_towers: int, device: torch.device) -> bool:
    """Whether a step's towers run in threads: training on the CPU with gradients, two towers or more and two
    threads or more, in one process (DistributedDataParallel's hooks expect one backward pass), not under autocast
    (its state is per thread)."""
    import torch.distributed as dist
    return (SIDE_BY_SIDE and n_towers > 1 and torch.get_num_threads() > 1 and device.type == "cpu" and torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu") and not (dist.is_available() and dist.is_initialized()))


def _in_threads(work: Callable, items: list) -> list:
    """work(item) of every item, each in a thread of its own on one core; torch's thread count comes back."""
    global _POOL
    if _POOL is None or _POOL._max_workers < len(items):  # one thread per tower, kept for the next step
        if _POOL is not None:
            _POOL.shutdown(wait=False)
        _POOL = ThreadPoolExecutor(len(items), thread_name_prefix="tower")
    threads = torch.get_num_threads()

    def one_core(item):
        torch.set_num_threads(1)  # OpenMP's count is per thread: each worker sets its own
        with torch.enable_grad():  # grad mode is per thread too
            return work(item)

    torch.set_num_threads(1)
    try:
        return list(_POOL.map(one_core, items))  # list: a tower's error is raised here
    finally:
        torch.set_num_threads(threads)


def run(tower: Callable[[str], dict[str, torch.Tensor]], names: list[str],
        device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
    """{name: tower(name)} for every name (a modality); each tower returns {key: tensor}. Side by side where
    `side_by_side` allows it, else one after another; the values and gradients are the same either way, up to the
    order of floating-point sums."""
    if not side_by_side(len(names), device):
        return {name: tower(name) for name in names}
    outputs = dict(zip(names, _in_threads(tower, names)))
    keys = [(name, key) for name in names for key, value in outputs[name].items() if value.requires_grad]
    graphs = [outputs[name][key] for name, key in keys]  # what each tower's backward starts from

    def backward(grads):
        by_tower = {name: ([], []) for name in names}
        for (name, _), graph, grad in zip(keys, graphs, grads):
            by_tower[name][0].append(graph)
            by_tower[name][1].append(grad)
        _in_threads(lambda name: torch.autograd.backward(*by_tower[name]), [n for n in names if by_tower[n][0]])

    anchor = torch.zeros((), device=device, requires_grad=True)  # so that what _Join returns is in the graph
    joined = _Join.apply(backward, anchor, tuple(graphs))
    for (name, key), value in zip(keys, joined):
        outputs[name][key] = value
    return outputs


class _Join(torch.autograd.Function):
    """The towers' outputs, copied into the graph of the rest of the loss; backward runs `backward(grads)`, which
    backpropagates each tower in its own thread. The towers' graphs are not inputs of this node (the outputs come
    as one tuple, which autograd does not follow): the engine would otherwise walk them a second time."""

    @staticmethod
    def forward(ctx, backward, anchor, outputs):
        ctx.backward = backward
        return tuple(output.detach().clone() for output in outputs)

    @staticmethod
    def backward(ctx, *grads):
        ctx.backward(grads)
        return None, None, None
