import torch, time, statistics, sys
import segops
from segops.ops.resize import half_resolution
torch.set_num_threads(int(sys.argv[1]))
x = torch.softmax(torch.randn(1, 21, 512, 512, generator=torch.Generator().manual_seed(0)), 1).requires_grad_()
g = torch.randn(1, 21, 256, 256)
def step():
    x.grad = None
    half_resolution(x).backward(g)
def bw_only():
    return torch.ops.segops._half_resolution_backward(g, [512, 512])
def fw_only():
    return torch.ops.segops._half_resolution(x.detach())
for name, f in (("step", step), ("bwd op", bw_only), ("fwd op", fw_only)):
    ts = []
    for i in range(30):
        t0 = time.perf_counter(); r = f(); ts.append(time.perf_counter() - t0); del r
    print(name, "min %.3f med %.3f" % (min(ts) * 1e3, statistics.median(ts) * 1e3))
from torch.profiler import profile
with profile() as p:
    for i in range(10): step()
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
