# Experimental: needs a build whose huge-page threshold (in 2 MiB units) is read from SEGOPS_HT (not in the tree).
import torch, time, os, statistics, sys
from segops.bench.crf import ECCV_SIGMA_RGB, ECCV_SIGMA_XY, ECCV_WEIGHT, K, _segmentation, _step, photo
from segops.nn import DenseCRFLoss, NormalizedCutLoss
img = photo("astronaut", 512)
seg = _segmentation(1, 512, 512, torch.Generator().manual_seed(0), torch.device("cpu"))
scale = float(sys.argv[1])
f = _step(DenseCRFLoss(ECCV_WEIGHT, ECCV_SIGMA_RGB, ECCV_SIGMA_XY, scale), img, seg)
res = {}
for i in range(25):
    for t in (1, 2):
        torch.set_num_threads(t)
        t0 = time.perf_counter(); f(); res.setdefault(t, []).append(time.perf_counter() - t0)
print("HT=%s scale %g: 1t min %.2f med %.2f | 2t min %.2f med %.2f | ratio %.2f" % (os.environ.get("SEGOPS_HT", "4"), scale,
      min(res[1])*1e3, statistics.median(res[1])*1e3, min(res[2])*1e3, statistics.median(res[2])*1e3, min(res[1])/min(res[2])))
