"""Per-call cost of segops' kernel choice on a convolution routed to the vendor: a tiny no-grad forward of
``segops.nn.AtrousConv2d`` ("auto", which routes it to ATen) against ``torch.nn.Conv2d`` with the same weights, and
the same for whole models (every conv routed as "auto" picks), so that the model-level difference is the overhead
alone (the convolutions themselves are identical ATen calls).

    python benchmarks/conv_call_overhead.py [--threads 1] [--repeat 15]

Timings are minima over interleaved repeats (the least disturbed estimate on a shared machine).
"""

from __future__ import annotations

import argparse
import timeit

import torch

from segops.models import get_model, to_torch_layers
from segops.nn import AtrousConv2d, describe_kernels


def best_us(fn, number: int, repeat: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=15)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    x = torch.randn(1, 8, 8, 8)
    mine = AtrousConv2d(8, 8, 3, padding=1)
    ref = torch.nn.Conv2d(8, 8, 3, padding=1)
    ref.load_state_dict(mine.state_dict())
    with torch.no_grad():
        t_ref, t_mine = [], []
        for _ in range(a.repeat):
            t_ref.append(best_us(lambda: ref(x), 200, 1))
            t_mine.append(best_us(lambda: mine(x), 200, 1))
        print("one layer, 1x8x8x8: torch.nn.Conv2d %.1f us, AtrousConv2d (auto -> vendor) %.1f us: +%.1f us per call"
              % (min(t_ref), min(t_mine), min(t_mine) - min(t_ref)))
        for name in ("fcn8s", "unet", "deeplabv3plus_resnet101"):
            torch.manual_seed(0)
            model = get_model(name, 21, width=0.25).eval()
            twin = to_torch_layers(model)
            xi = torch.randn(1, 3, 33, 33)
            calls = len(describe_kernels(model, xi))
            tm, tt = [], []
            for _ in range(a.repeat):
                tt.append(best_us(lambda: twin(xi), 3, 1))
                tm.append(best_us(lambda: model(xi), 3, 1))
            print("%-24s 1x3x33x33 eval forward: torch layers %.0f us, segops layers %.0f us: +%.1f us per conv call "
                  "(%d calls)" % (name, min(tt), min(tm), (min(tm) - min(tt)) / calls, calls))


if __name__ == "__main__":
    main()
