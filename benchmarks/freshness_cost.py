"""What keeping the cached layouts fresh costs: a batch-1 CondensedLinear inference
call (each call checks the cached window layout against a 16-element sample of
values and idx), and a fused AdamW step with and without the package's optimizer
step hook (which moves each stepped parameter's version counter).

    python benchmarks/freshness_cost.py            # this build
    PYTHONPATH=/path/to/other/build python benchmarks/freshness_cost.py   # another

Prints one line per figure: the median over rounds of the per-call time, hook on
and off interleaved round by round."""

import argparse
import platform
import statistics
import time

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

import condensed_ops
from condensed_ops import CondensedLinear
from condensed_ops.masks import constant_fan_in_mask


def per_call_us(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    print(f"{cpu}, {args.threads} thread(s), torch {torch.__version__}, condensed_ops from {condensed_ops.__file__}")

    generator = torch.Generator().manual_seed(0)
    layer = CondensedLinear.from_linear(nn.Linear(768, 3072), constant_fan_in_mask(3072, 768, 77, generator)).eval()
    x = torch.randn(1, 768, generator=generator)

    def infer():
        with torch.no_grad():
            layer(x)

    infer()
    forward = [per_call_us(infer, 2000) for _ in range(args.rounds)]
    print(f"batch-1 inference, 768->3072 at 90% (window layout): {statistics.median(forward):.2f} us per call")

    freshness = getattr(condensed_ops, "freshness", None)
    if freshness is None:
        return  # a build from before the hook
    model = nn.Sequential(*[CondensedLinear.from_linear(nn.Linear(768, 768), constant_fan_in_mask(768, 768, 77, generator)) for _ in range(4)])
    model(torch.randn(8, 768)).sum().backward()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    on, off = [], []
    for _ in range(args.rounds):
        on.append(per_call_us(opt.step, 200))
        freshness._optimizer_hook.remove()
        off.append(per_call_us(opt.step, 200))
        freshness._optimizer_hook = register_optimizer_step_post_hook(freshness._mark_stepped_parameters)
    print(f"fused AdamW step, 4 condensed 768x768 layers (8 tensors): hook on {statistics.median(on):.2f} us, "
          f"off {statistics.median(off):.2f} us")


if __name__ == "__main__":
    main()
