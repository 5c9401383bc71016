# interleave (1 untimed + 1 timed per switch) vs blocks (W untimed + N timed per switch), one process
import sys, time, statistics, torch
from segops.bench.crf import ECCV_SIGMA_RGB, ECCV_SIGMA_XY, ECCV_WEIGHT, K, photo
from segops.nn import DenseCRFLoss
scale = float(sys.argv[1]); W = int(sys.argv[2]); N = int(sys.argv[3]); R = int(sys.argv[4])
img = photo("astronaut", 512)
seg = torch.softmax(torch.randn(1, K, 512, 512, generator=torch.Generator().manual_seed(0)), 1).requires_grad_()
loss = DenseCRFLoss(weight=ECCV_WEIGHT, sigma_rgb=ECCV_SIGMA_RGB, sigma_xy=ECCV_SIGMA_XY, scale_factor=scale)
def step():
    seg.grad = None; loss(img, seg).backward()
res = {}
for r in range(R):
    for mode, (w, n) in (("inter", (1, 1)), ("block", (W, N))):
        for t in (1, 2):
            torch.set_num_threads(t)
            for _ in range(w): step()
            for _ in range(n):
                t0 = time.perf_counter(); step(); res.setdefault((mode, t), []).append(time.perf_counter() - t0)
m = {k: statistics.median(v) * 1e3 for k, v in res.items()}
print("scale", scale, " ".join("%s %dT %.2f" % (k[0], k[1], v) for k, v in sorted(m.items())),
      "| inter %.3f block %.3f" % (m[("inter", 1)] / m[("inter", 2)], m[("block", 1)] / m[("block", 2)]))
