# same-process A/B: segops-forced convs with SEGOPS_CPU_GEMM=segops vs aten, vs vendor; fwd+bwd
import os, sys, torch, torch.nn.functional as F
from torch.utils import benchmark as tb
import segops
from segops.ops.conv_choice import conv_backend
th = int(sys.argv[1]) if len(sys.argv) > 1 else 2
torch.set_num_threads(th); torch.manual_seed(0)
def case(name, N, Ci, Co, hw, r):
    x = torch.randn(N, Ci, hw, hw, requires_grad=True); w = (torch.randn(Co, Ci, 3, 3) * 0.02).requires_grad_(); b = torch.randn(Co, requires_grad=True)
    def run(backend, gemm):
        os.environ["SEGOPS_CPU_GEMM"] = gemm
        with conv_backend(backend):
            y = segops.ops.atrous_conv2d(x, w, b, padding=r, dilation=r)
            y.backward(torch.ones_like(y))
        return y
    res = {}
    ref = F.conv2d(x, w, b, padding=r, dilation=r)
    for be, gm in (("segops", "segops"), ("segops", "aten"), ("vendor", "aten")):
        x.grad = w.grad = b.grad = None
        y = run(be, gm)
        err = (y - ref).abs().max().item()
        res[(be, gm)] = (y.detach(), w.grad.clone(), x.grad.clone())
        print(f"  {be}/{gm} max|y-ref| {err:.2e}")
    ts = {}
    for rep in range(3):
        for be, gm in (("segops", "segops"), ("segops", "aten"), ("vendor", "aten")):
            t = tb.Timer("run(be, gm)", globals=dict(run=run, be=be, gm=gm)).blocked_autorange(min_run_time=1.0).median
            ts.setdefault((be, gm), []).append(t)
    v = min(ts[("vendor", "aten")])
    print(name, "  ".join(f"{be}/{gm} {min(t)*1e3:.1f} ms ({v/min(t):.2f}x vendor)" for (be, gm), t in ts.items()))
print("enabled default:", torch.ops.segops._cpu_gemm_enabled())
for r in (6, 12, 18, 24):
    case(f"aspp r{r} 4x512->256 33", 4, 512, 256, 33, r)
