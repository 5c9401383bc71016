import os, sys, time, statistics, torch
from torch.profiler import profile, ProfilerActivity
from segops.bench.crf import ECCV_SIGMA_RGB, ECCV_SIGMA_XY, ECCV_WEIGHT, K, photo
from segops.nn import DenseCRFLoss
scale = float(sys.argv[2]); th = int(sys.argv[1])
torch.set_num_threads(th)
img = photo("astronaut", 512)
seg = torch.softmax(torch.randn(1, K, 512, 512, generator=torch.Generator().manual_seed(0)), 1).requires_grad_()
loss = DenseCRFLoss(weight=ECCV_WEIGHT, sigma_rgb=ECCV_SIGMA_RGB, sigma_xy=ECCV_SIGMA_XY, scale_factor=scale)
def step():
    seg.grad = None; loss(img, seg).backward()
for _ in range(10): step()
N=20
with profile(activities=[ProfilerActivity.CPU]) as p:
    for _ in range(N): step()
ev = p.key_averages()
rows = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:25]
for e in rows:
    print("%-55s %6d calls  self %8.3f ms/step  total %8.3f" % (e.key[:55], e.count//N, e.self_cpu_time_total/1e3/N, e.cpu_time_total/1e3/N))
