# In-process comparison of several values of an env switch on the whole DenseCRFLoss step; VAR, VALS=a,b,c.
import os, sys, time, statistics, torch
from segops.bench.crf import ECCV_SIGMA_RGB, ECCV_SIGMA_XY, ECCV_WEIGHT, K, photo
from segops.nn import DenseCRFLoss
VAR, VALS = os.environ["VAR"], os.environ["VALS"].split(",")
scale = float(os.environ.get("SCALE", "1"))
img = photo("astronaut", 512)
seg = torch.softmax(torch.randn(1, K, 512, 512, generator=torch.Generator().manual_seed(0)), 1).requires_grad_()
loss = DenseCRFLoss(weight=ECCV_WEIGHT, sigma_rgb=ECCV_SIGMA_RGB, sigma_xy=ECCV_SIGMA_XY, scale_factor=scale)
def step():
    seg.grad = None; loss(img, seg).backward()
res = {}
for th in [int(t) for t in os.environ.get("THREADS", "1,2").split(",")]:
    torch.set_num_threads(th)
    for r in range(int(os.environ.get("R", "30"))):
        order = VALS if r % 2 == 0 else VALS[::-1]
        for v in order:
            os.environ[VAR] = v
            step()
            t = time.perf_counter(); step(); res.setdefault((th, v), []).append(time.perf_counter() - t)
print(" ".join("%dT %s=%.2f" % (k[0], k[1], statistics.median(v) * 1e3) for k, v in res.items()))
