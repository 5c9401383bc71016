# DenseCRFLoss step at scale 0.5: half_resolution forward, rest of forward, backward up to x_half's grad,
# half_resolution backward (x_half's grad -> seg's grad); medians of 40 at argv[1] threads.
import time, statistics, torch, sys, collections
from segops.bench.crf import ECCV_SIGMA_RGB, ECCV_SIGMA_XY, ECCV_WEIGHT, K, photo
from segops.nn import DenseCRFLoss
import segops.ops.crf_losses as cl
torch.set_num_threads(int(sys.argv[1]))
T = {}
orig = cl.half_resolution
def hr(x):
    T["h0"] = time.perf_counter(); y = orig(x); T["h1"] = time.perf_counter()
    y.register_hook(lambda g: T.__setitem__("gh", time.perf_counter()))
    return y
cl.half_resolution = hr
img = photo("astronaut", 512)
seg = torch.softmax(torch.randn(1, K, 512, 512, generator=torch.Generator().manual_seed(0)), 1).requires_grad_()
seg.register_hook(lambda g: T.__setitem__("gs", time.perf_counter()))
loss = DenseCRFLoss(weight=ECCV_WEIGHT, sigma_rgb=ECCV_SIGMA_RGB, sigma_xy=ECCV_SIGMA_XY, scale_factor=0.5)
acc = collections.defaultdict(list)
def step():
    seg.grad = None
    t0 = time.perf_counter(); l = loss(img, seg); t1 = time.perf_counter(); l.backward(); t2 = time.perf_counter()
    return t0, t1, t2
for _ in range(5): step()
for _ in range(40):
    t0, t1, t2 = step()
    for k, a, b in (("pre", t0, T["h0"]), ("hr_fwd", T["h0"], T["h1"]), ("fwd_rest", T["h1"], t1), ("bwd_forms", t1, T["gh"]),
                    ("hr_bwd", T["gh"], T["gs"]), ("bwd_end", T["gs"], t2), ("all", t0, t2)):
        acc[k].append((b - a) * 1e3)
print(" ".join("%s %.3f" % (k, statistics.median(v)) for k, v in acc.items()))
