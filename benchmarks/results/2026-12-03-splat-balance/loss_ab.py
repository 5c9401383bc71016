import sys, time, statistics, torch
from segops.nn import DenseCRFLoss
from segops.bench.crf import ECCV_SIGMA_RGB, ECCV_SIGMA_XY, ECCV_WEIGHT, K, photo
img = photo("astronaut", 512)
g = torch.Generator().manual_seed(0)
seg0 = torch.softmax(torch.randn(1, K, 512, 512, generator=g), 1)
loss = DenseCRFLoss(weight=ECCV_WEIGHT, sigma_rgb=ECCV_SIGMA_RGB, sigma_xy=ECCV_SIGMA_XY, scale_factor=float(sys.argv[2]))
torch.set_num_threads(int(sys.argv[1]))
def step():
    seg = seg0.clone().requires_grad_()
    l = loss(img, seg); l.backward()
    return l.detach(), seg.grad
for _ in range(3): step()
ts = []
for _ in range(15):
    t0 = time.perf_counter(); r = step(); ts.append((time.perf_counter() - t0) * 1e3)
torch.save(r, sys.argv[3])
print("%.1f" % statistics.median(ts))
