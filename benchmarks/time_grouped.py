"""The grouped tensor-core kernel against dense bf16 cuBLAS at 4096 -> 14336,
batch 256, 90% sparse (fan_in 410), and the per-row kernel (g = 1):
CUDA-graph replay medians per call. The condensed weights rotate over six
sets (~70 MB, more than L2), so no call finds its weights cached; the dense
weight (117 MB) cannot be. Prints a table; writes $OUT/time_grouped.json.

    python benchmarks/time_grouped.py      # needs a CUDA device and the built extension
"""

import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

import condensed_ops

IN, OUT, BATCH, FAN_IN = 4096, 14336, 256, 410
DTYPE = torch.bfloat16
WEIGHT_SETS = 6


def graph_time_us(calls, replays=30):
    """Median and min over replays of one graph holding every call, per call."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) * 1000 / len(calls))
    return statistics.median(times), min(times)


def eager_time_us(call, reps=50):
    for _ in range(5):
        call()
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(reps):
        call()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) * 1000 / reps


def main() -> int:
    torch.manual_seed(0)
    x = torch.randn(BATCH, IN, device="cuda", dtype=DTYPE)
    rows = []
    dense_w = torch.randn(OUT, IN, device="cuda", dtype=DTYPE)
    dense_us, dense_min = graph_time_us([lambda: F.linear(x, dense_w)])
    rows.append(dict(method="dense F.linear", graph_us=dense_us, graph_min_us=dense_min,
                     eager_us=eager_time_us(lambda: F.linear(x, dense_w)), speedup_vs_dense=1.0))
    transpose_us, _ = graph_time_us([lambda: x.t().contiguous()])
    rows.append(dict(method="x.t().contiguous() alone", graph_us=transpose_us))
    for g in (1, 8, 16, 32):
        name = "per-row condensed (g=1)" if g == 1 else f"grouped g={g}"
        try:
            groups = OUT // g
            sets = []
            for _ in range(WEIGHT_SETS):
                # Distinct random columns per group.
                idx = torch.rand(groups, IN, device="cuda").topk(FAN_IN, dim=1).indices.to(torch.int16)
                values = (torch.randn(groups, g, FAN_IN, device="cuda") * FAN_IN**-0.5).to(DTYPE)
                sets.append((values.reshape(OUT, FAN_IN) if g == 1 else values, idx))
            calls = [lambda v=v, i=i: condensed_ops.condensed_linear(x, v, i) for v, i in sets]
            graph_us, graph_min = graph_time_us(calls)
            eager_us = eager_time_us(calls[0])
            values, idx = sets[0]
            y = condensed_ops.condensed_linear(x, values, idx).double()
            rows_idx = idx.long().repeat_interleave(g, 0) if g > 1 else idx.long()
            weight = torch.zeros(OUT, IN, device="cuda", dtype=torch.float64)
            weight.scatter_(1, rows_idx, values.reshape(OUT, FAN_IN).double())
            ref = x.double() @ weight.t()
            rows.append(dict(method=name, graph_us=graph_us, graph_min_us=graph_min, eager_us=eager_us,
                             speedup_vs_dense=dense_us / graph_us, rel_err=((y - ref).norm() / ref.norm()).item()))
        except Exception as e:  # keep timing the others
            rows.append(dict(method=name, error=repr(e)))
    print(f"{IN}x{OUT} batch {BATCH} fan_in {FAN_IN} bf16 on {torch.cuda.get_device_name()}")
    print(f"{'method':26s} {'graph us':>9s} {'min us':>8s} {'eager us':>9s} {'dense/this':>10s} {'rel err':>9s}")
    nan = float("nan")
    for row in rows:
        if "error" in row:
            print(f"{row['method']:26s} ERROR {row['error']}")
            continue
        print(f"{row['method']:26s} {row['graph_us']:9.1f} {row.get('graph_min_us', nan):8.1f} "
              f"{row.get('eager_us', nan):9.1f} {row.get('speedup_vs_dense', nan):10.2f} {row.get('rel_err', nan):9.2e}")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "time_grouped.json"), "w") as f:
            json.dump(dict(shape=f"{IN}x{OUT}", batch=BATCH, fan_in=FAN_IN, dtype="bfloat16", rows=rows), f, indent=1)
    bad = [r for r in rows if "error" in r or r.get("rel_err", 0) > 2e-2]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
