# one process: the four loss rows' 1- and 2-thread minima (alternated), and a SAVE/CMP of values
import torch, sys, os
from segops.bench import thread_scaling
from segops.bench.crf import ECCV_SIGMA_RGB, ECCV_SIGMA_XY, ECCV_WEIGHT, K, _segmentation, _step, photo
from segops.nn import DenseCRFLoss, NormalizedCutLoss
img = photo("astronaut", 512)
seg = _segmentation(1, 512, 512, torch.Generator().manual_seed(0), torch.device("cpu"))
out = []
for cls in (DenseCRFLoss, NormalizedCutLoss):
    for scale in (1.0, 0.5):
        sc = thread_scaling(_step(cls(ECCV_WEIGHT, ECCV_SIGMA_RGB, ECCV_SIGMA_XY, scale), img, seg), 10)
        out.append("%s/%g %.1f/%.1f %.2fx" % (cls.__name__[:4], scale, sc["threads_1_ms"], sc["threads_2_ms"], sc["speedup"]))
print("  ".join(out), end="")
