import torch, sys
from torch.utils import benchmark as tb
import segops
torch.set_num_threads(2); torch.manual_seed(0)
for (n, ci, co, hw) in [(1, 2048, 512, 7), (1, 512, 2048, 7), (2, 256, 64, 11), (1, 64, 21, 5), (8, 1024, 256, 14), (1, 2048, 21, 33), (1, 21, 21, 1)]:
    x = torch.randn(n, ci, hw, hw, requires_grad=True); w = (torch.randn(co, ci, 1, 1) * 0.05).requires_grad_(); b = torch.randn(co, requires_grad=True)
    def run(be):
        y = segops.ops.atrous_conv2d(x, w, b, backend=be); y.backward(torch.ones_like(y))
    ts = {}
    for rep in range(3):
        for be in ("segops", "vendor"):
            ts.setdefault(be, []).append(tb.Timer("run(be)", globals=dict(run=run, be=be)).blocked_autorange(min_run_time=0.3).median)
    s, v = min(ts["segops"]), min(ts["vendor"])
    print(f"{n}x{ci}->{co} {hw}x{hw}: segops {s*1e3:.3f} ms vendor {v*1e3:.3f} ms  ratio {v/s:.2f}x")
