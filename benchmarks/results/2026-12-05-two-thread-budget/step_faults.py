import os, sys, time, resource, torch
from segops.bench.crf import ECCV_SIGMA_RGB, ECCV_SIGMA_XY, ECCV_WEIGHT, K, photo
from segops.nn import DenseCRFLoss
th = int(sys.argv[1]); scale = float(sys.argv[2])
torch.set_num_threads(th)
img = photo("astronaut", 512)
seg = torch.softmax(torch.randn(1, K, 512, 512, generator=torch.Generator().manual_seed(0)), 1).requires_grad_()
loss = DenseCRFLoss(weight=ECCV_WEIGHT, sigma_rgb=ECCV_SIGMA_RGB, sigma_xy=ECCV_SIGMA_XY, scale_factor=scale)
def step():
    seg.grad = None; loss(img, seg).backward()
for _ in range(10): step()
out = []
for _ in range(20):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; t = time.perf_counter(); step(); t1 = time.perf_counter()
    out.append("%d/%.2f" % (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0, (t1 - t) * 1e3))
print(" ".join(out))
