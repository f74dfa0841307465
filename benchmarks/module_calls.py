"""Module calls timed for a before/after comparison of two builds: install each in its own
virtual environment and alternate them, e.g.

    for r in 1 2 3; do old/bin/python benchmarks/module_calls.py 1; new/bin/python benchmarks/module_calls.py 1; done

Each run prints one JSON line of medians (µs): a dense nn.Linear control (the machine's
drift), CondensedLinear 768->3072 at 90% at batch 1 (window layout) and 256 (row layout),
with 300 ablated neurons, grouped g=8 at batch 1 (its row path) and 256, and forward +
backward at batch 256. The argument is the thread count.
"""
import json, sys, time, statistics
import torch
import condensed_ops
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
torch.manual_seed(0)

def timeit(fn, reps=200, warm=20):
    for _ in range(warm): fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6

def layer(inf, outf, group=1, ablate=0):
    w = torch.randn(outf, inf)
    mask = condensed_ops.masks.constant_fan_in_mask(outf, inf, int(0.1 * inf))
    if group > 1:
        mask = condensed_ops.masks.grouped_fan_in_mask(outf, inf, int(0.1 * inf), group)
    if ablate:
        mask[:ablate] = False
    lin = torch.nn.Linear(inf, outf); lin.weight.data = w
    return condensed_ops.CondensedLinear.from_linear(lin, mask=mask, group_size=group), lin

out = {}
with torch.no_grad():
    m, lin = layer(768, 3072); m.eval()
    x1, x256 = torch.randn(1, 768), torch.randn(256, 768)
    out["dense_b1"] = timeit(lambda: lin(x1))
    out["module_b1"] = timeit(lambda: m(x1))
    out["module_b256"] = timeit(lambda: m(x256), reps=30)
    ma, _ = layer(768, 3072, ablate=300); ma.eval()
    out["ablated_b1"] = timeit(lambda: ma(x1))
    out["ablated_b256"] = timeit(lambda: ma(x256), reps=30)
    mg, _ = layer(768, 3072, group=8); mg.eval(); mg.inference_layout = False
    out["grouped8_rowpath_b1"] = timeit(lambda: mg(x1))
    out["grouped8_b256"] = timeit(lambda: mg(x256), reps=30)
m.train()
xg = torch.randn(256, 768, requires_grad=True)
def step():
    y = m(xg); y.sum().backward()
out["fwd_bwd_b256"] = timeit(step, reps=15, warm=3)
print(json.dumps(out))
