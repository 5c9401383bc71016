import torch, time, os, statistics, sys
from segops.bench.crf import ECCV_SIGMA_RGB, ECCV_SIGMA_XY, ECCV_WEIGHT, K, _segmentation, _step, photo
from segops.nn import DenseCRFLoss
img = photo("astronaut", 512)
seg = _segmentation(1, 512, 512, torch.Generator().manual_seed(0), torch.device("cpu"))
f = _step(DenseCRFLoss(ECCV_WEIGHT, ECCV_SIGMA_RGB, ECCV_SIGMA_XY, 1.0), img, seg)
torch.set_num_threads(1)
ts = []
for i in range(40):
    t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
print("min %.3f med %.3f" % (min(ts)*1e3, statistics.median(ts)*1e3), end="")
