import os, sys, time, statistics, torch
from segops.bench.crf import ECCV_SIGMA_RGB, ECCV_SIGMA_XY, ECCV_WEIGHT, K, photo
from segops.nn import DenseCRFLoss
img = photo("astronaut", 512)
g = torch.Generator().manual_seed(0)
seg = torch.softmax(torch.randn(1, K, 512, 512, generator=g), 1).requires_grad_()
out = []
for scale in (1.0, 0.5):
    loss = DenseCRFLoss(ECCV_WEIGHT, ECCV_SIGMA_RGB, ECCV_SIGMA_XY, scale)
    def op():
        seg.grad = None; loss(img, seg).backward()
    ts = {1: [], 2: []}
    for t in (1, 2):
        torch.set_num_threads(t); op(); op()
    for _ in range(15):
        for t in (1, 2):
            torch.set_num_threads(t)
            t0 = time.perf_counter(); op(); ts[t].append((time.perf_counter() - t0) * 1e3)
    m1, m2 = statistics.median(ts[1]), statistics.median(ts[2])
    out.append("s%.1f 1T %.2f 2T %.2f (%.2fx)" % (scale, m1, m2, m1 / m2))
print(" | ".join(out), end=" ")
