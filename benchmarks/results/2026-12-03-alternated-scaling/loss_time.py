# DenseCRFLoss forward + backward on the ECCV'18 workload (astronaut 512², K = 21, B = 1) at scale 1 and 0.5,
# 1 and 2 threads alternated call by call: "min / median ms" over 15 calls each, and the 2/1 ratio of the minima.
# With SAVE=path the loss and gradient are saved (to compare two builds bit for bit).
import os, statistics, time, torch
from segops.nn import DenseCRFLoss
from segops.bench.crf import ECCV_SIGMA_RGB, ECCV_SIGMA_XY, ECCV_WEIGHT, K, photo
img = photo("astronaut", 512)
g = torch.Generator().manual_seed(0)
seg = torch.softmax(torch.randn(1, K, 512, 512, generator=g), 1).requires_grad_()
out, row = {}, []
for scale in (1.0, 0.5):
    loss = DenseCRFLoss(weight=ECCV_WEIGHT, sigma_rgb=ECCV_SIGMA_RGB, sigma_xy=ECCV_SIGMA_XY, scale_factor=scale)
    ts = {1: [], 2: []}
    for r in range(16):
        for th in (1, 2):
            torch.set_num_threads(th)
            seg.grad = None
            t0 = time.perf_counter()
            value = loss(img, seg)
            value.backward()
            if r > 0:
                ts[th].append((time.perf_counter() - t0) * 1e3)
    out[scale] = (value.detach(), seg.grad.clone())
    row.append("scale %g: 1 thread %.1f / %.1f, 2 threads %.1f / %.1f, %.2fx" % (
        scale, min(ts[1]), statistics.median(ts[1]), min(ts[2]), statistics.median(ts[2]), min(ts[1]) / min(ts[2])))
print(" | ".join(row), end="")
if os.environ.get("SAVE"):
    torch.save(out, os.environ["SAVE"])
