import os, sys, time, statistics, torch
from segops.nn import DenseCRFLoss
from segops.bench.crf import ECCV_SIGMA_RGB, ECCV_SIGMA_XY, ECCV_WEIGHT, K, photo
img = photo("astronaut", 512)
g = torch.Generator().manual_seed(0)
seg0 = torch.softmax(torch.randn(1, K, 512, 512, generator=g), 1)
def step(loss):
    seg = seg0.clone().requires_grad_()
    l = loss(img, seg); l.backward()
    return l.detach(), seg.grad
for scale in (1.0, 0.5):
    loss = DenseCRFLoss(weight=ECCV_WEIGHT, sigma_rgb=ECCV_SIGMA_RGB, sigma_xy=ECCV_SIGMA_XY, scale_factor=scale)
    ts = {}
    res = {}
    for r in range(15):
        for th in (1, 2):
            torch.set_num_threads(th)
            for mode in ("0", "1"):
                os.environ["SEGOPS_LATTICE_SHARED_BUILD"] = mode
                if r == 0: step(loss)
                t0 = time.perf_counter(); out = step(loss); ts.setdefault((th, mode), []).append((time.perf_counter() - t0) * 1e3)
                res[(th, mode)] = out
    same = all(torch.equal(a, b) for k in res for a, b in zip(res[k], res[(1, "1")]))
    m = {k: statistics.median(v) for k, v in ts.items()}
    print("scale %g: 1 thread range %.1f shared %.1f | 2 threads range %.1f shared %.1f | 2/1 range %.2fx shared %.2fx | bitwise same %s" % (
        scale, m[(1, "0")], m[(1, "1")], m[(2, "0")], m[(2, "1")], m[(1, "0")] / m[(2, "0")], m[(1, "1")] / m[(2, "1")], same))
