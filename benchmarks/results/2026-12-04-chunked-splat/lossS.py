# Experimental: needs a build whose CPU splat reads its chunk count from SEGOPS_S (not in the tree).
import torch, time, os, statistics, sys
from segops.bench.crf import ECCV_SIGMA_RGB, ECCV_SIGMA_XY, ECCV_WEIGHT, K, _segmentation, _step, photo
from segops.nn import DenseCRFLoss
img = photo("astronaut", 512)
seg = _segmentation(1, 512, 512, torch.Generator().manual_seed(0), torch.device("cpu"))
f = _step(DenseCRFLoss(ECCV_WEIGHT, ECCV_SIGMA_RGB, ECCV_SIGMA_XY, 1.0), img, seg)
torch.set_num_threads(int(sys.argv[1]))
ts = {s: [] for s in ("1", "2")}
for i in range(30):
    for s in ts:
        os.environ["SEGOPS_S"] = s
        t0 = time.perf_counter(); f(); ts[s].append(time.perf_counter() - t0)
print(" ".join("S=%s min %.3f med %.3f" % (k, min(v)*1e3, statistics.median(v)*1e3) for k, v in ts.items()))
