# in-process A/B of VAR on the profiler's kernel times (1 thread): loss or filter C
import os, sys, statistics, torch
torch.set_num_threads(1)
from segops.bench.crf import ECCV_SIGMA_RGB, ECCV_SIGMA_XY, ECCV_WEIGHT, K, photo
from segops.nn import DenseCRFLoss
from segops.ops import permutohedral_filter
from segops.reference_lattice import crf_features
var = os.environ["VAR"]; case = os.environ.get("CASE", "loss")
img = photo("astronaut", 512)
g = torch.Generator().manual_seed(0)
if case == "loss":
    seg = torch.softmax(torch.randn(1, K, 512, 512, generator=g), 1).requires_grad_()
    loss = DenseCRFLoss(ECCV_WEIGHT, ECCV_SIGMA_RGB, ECCV_SIGMA_XY, 1.0)
    def op():
        seg.grad = None; loss(img, seg).backward()
else:
    C = int(case)
    feats = crf_features(img.float(), sigma_rgb=15.0, sigma_xy=80.0)
    x = torch.rand(1, C, 512, 512, generator=g)
    op = lambda: permutohedral_filter(x, feats)
res = {True: {}, False: {}}
for r in range(int(os.environ.get("R", "12"))):
    for on in (True, False):
        if on: os.environ[var] = "1"
        else: os.environ.pop(var, None)
        with torch.profiler.profile() as p:
            op()
        if r < 2: continue
        tot = 0
        for e in p.key_averages():
            if e.key.startswith("segops_kernel::"):
                res[on].setdefault(e.key, []).append(e.self_cpu_time_total / 1e3)
            tot += e.self_cpu_time_total / 1e3
        res[on].setdefault("total", []).append(tot)
keys = sorted(res[True], key=lambda k: -statistics.median(res[True][k]))
for k in keys[:8]:
    a, b = statistics.median(res[True][k]), statistics.median(res[False].get(k, [0]))
    print("%-28s set %6.2f  unset %6.2f" % (k, a, b))
