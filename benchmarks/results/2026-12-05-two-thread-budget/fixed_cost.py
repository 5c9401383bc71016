import torch, time, statistics, segops, sys
from segops.nn import DenseCRFLoss
import segops.ops.crf_losses as cl
from segops.ops.resize import half_resolution
torch.set_num_threads(1)
S = 8
img = torch.rand(1, 3, S, S) * 255
seg = torch.softmax(torch.randn(1, 21, S, S), 1).requires_grad_()
def med(f, n=500):
    for _ in range(50): f()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6
for scale in (1.0, 0.5):
    loss = DenseCRFLoss(2e-9, 15, 80, scale)
    L = [None]
    def fwd(): L[0] = loss(img, seg)
    def bwd():
        seg.grad = None; l = loss(img, seg); t = time.perf_counter(); l.backward(); return time.perf_counter() - t
    fw = med(fwd)
    bts = [bwd() for _ in range(500)]
    print(scale, "fwd %.1f us, bwd %.1f us" % (fw, statistics.median(bts) * 1e6))
x = torch.randn(1, 21, S, S, requires_grad=True)
print("half_resolution fwd (grad) %.1f us" % med(lambda: half_resolution(x)))
with torch.no_grad(): print("half_resolution fwd (nograd) %.1f us" % med(lambda: half_resolution(x)))
print("prepare %.1f us" % med(lambda: cl._prepare("x", img, seg, None, 15., 80., 0.5)))
from segops.ops.lattice import crf_features
print("crf_features %.1f us" % med(lambda: crf_features(img, 15., 80.)))
f = crf_features(img, 15., 80.)
print("lattice %.1f us" % med(lambda: torch.ops.segops.permutohedral_lattice.default(f)))
v, b, n = torch.ops.segops.permutohedral_lattice.default(f)
print("forms (grad) %.1f us" % med(lambda: torch.ops.segops._lattice_quadratic_forms.default(x, None, v, b, n, False, False)))
with torch.no_grad(): print("forms (nograd) %.1f us" % med(lambda: torch.ops.segops._lattice_quadratic_forms.default(x, None, v, b, n, False, False)))
