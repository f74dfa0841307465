"""Interleaved timing of several calls that compute the same thing.

Every round runs each call once in a fresh random order, so a drifting clock, a
busy neighbour or a cache left warm by the previous call hits all of them alike;
results are medians over rounds. Fast calls repeat within one sample so the
timer's resolution does not matter.

On CUDA two times are taken per call:

- **eager**: host wall time per call with the queue drained before and after a
  batch of calls, i.e. what a Python loop pays, launch overhead included;
- **graph**: the calls captured once in a CUDA graph, replays timed with CUDA
  events: the device time of the kernels themselves.
"""

import random
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional

import torch

Call = Callable[[], object]


@dataclass(frozen=True)
class Timing:
    """Median seconds per call; ``graph_seconds`` only on CUDA, None when the call
    could not be captured (``graph_error`` says why)."""

    seconds: float
    rounds: int
    graph_seconds: Optional[float] = None
    graph_error: Optional[str] = None

    @property
    def kernel_seconds(self) -> float:
        """The time that derived figures use: graph replay on CUDA when there is one, else eager."""
        return self.graph_seconds if self.graph_seconds is not None else self.seconds


def speedup(baseline: Mapping[str, Optional[float]], other: Mapping[str, Optional[float]]) -> float:
    """``baseline`` time over ``other``'s, from two result rows (or ``asdict(Timing)``):
    graph-replay times when both have one, else eager times, so a ratio never mixes the two."""
    if baseline.get("graph_seconds") is not None and other.get("graph_seconds") is not None:
        return baseline["graph_seconds"] / other["graph_seconds"]
    return baseline["seconds"] / other["seconds"]


def with_tf32(call: Callable[[], object], allow: bool) -> Callable[[], object]:
    """Sets cuBLAS's TF32 switch for the call (and for a graph captured around it)."""

    def run() -> object:
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = allow
        try:
            return call()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous

    return run


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _eager_sample(call: Call, repeats: int, device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    _synchronize(device)
    return (time.perf_counter() - start) / repeats


class _GraphedCall:
    """``repeats`` calls captured in one CUDA graph, timed with events per replay."""

    def __init__(self, call: Call, repeats: int, device: torch.device) -> None:
        self.repeats = repeats
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # capture wants warm-up off the default stream
            for _ in range(2):
                call()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            for _ in range(repeats):
                call()
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def sample(self) -> float:
        self.start.record()
        self.graph.replay()
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end) * 1e-3 / self.repeats


def first_line(error: BaseException) -> str:
    """``Type: first line of the message``, for a table cell."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def time_interleaved(
    calls: Mapping[str, Call],
    device: torch.device = torch.device("cpu"),
    rounds: int = 20,
    min_rounds: int = 3,
    min_sample_seconds: float = 2e-4,
    max_seconds: float = 10.0,
) -> Dict[str, Timing]:
    """Median time per call of each of ``calls`` (no arguments; results are discarded).

    Args:
        calls: ``{name: call}``.
        device: where the calls run; CUDA adds graph-replay times.
        rounds: rounds to run, each calling every method once (``repeats`` times).
        min_rounds: rounds run even when that overshoots ``max_seconds``.
        min_sample_seconds: a sample repeats a fast call until it lasts about this long.
        max_seconds: fewer rounds (never under ``min_rounds``) when the estimate says
            ``rounds`` would take longer than this.
    """
    device = torch.device(device)
    for call in calls.values():  # warm caches, pages, the allocator and the thread pool
        call()
    repeats: Dict[str, int] = {}
    estimate = 0.0
    for name, call in calls.items():
        once = _eager_sample(call, 1, device)  # the second call: warm, and an estimate
        repeats[name] = max(1, int(min_sample_seconds / max(once, 1e-9)))
        estimate += once * repeats[name]
    rounds = max(min_rounds, min(rounds, int(max_seconds / max(estimate, 1e-9))))

    graphs: Dict[str, _GraphedCall] = {}
    graph_errors: Dict[str, str] = {}
    if device.type == "cuda":
        for name, call in calls.items():
            try:
                graphs[name] = _GraphedCall(call, repeats[name], device)
            except Exception as error:  # noqa: BLE001 -- e.g. a library call that syncs during capture
                graph_errors[name] = first_line(error)
                torch.cuda.synchronize(device)

    eager = {name: [] for name in calls}
    graphed = {name: [] for name in graphs}
    order = list(calls)
    for _ in range(rounds):
        random.shuffle(order)
        for name in order:
            eager[name].append(_eager_sample(calls[name], repeats[name], device))
            if name in graphs:
                graphed[name].append(graphs[name].sample())
    return {
        name: Timing(
            seconds=statistics.median(eager[name]),
            rounds=rounds,
            graph_seconds=statistics.median(graphed[name]) if name in graphed else None,
            graph_error=graph_errors.get(name),
        )
        for name in calls
    }
