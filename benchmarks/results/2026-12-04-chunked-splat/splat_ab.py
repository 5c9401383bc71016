# Lattice ops of the CRF loss (build, splat+blur+dots, slice) at 1 and 2 threads, alternated, on the astronaut.
import torch, time, sys
from segops.bench.crf import ECCV_SIGMA_RGB, ECCV_SIGMA_XY, _segmentation, photo
from segops.ops.lattice import build_lattice
import segops
img = photo("astronaut", 512)
seg = _segmentation(1, 512, 512, torch.Generator().manual_seed(0), torch.device("cpu")).contiguous()
print(seg.shape, seg.dtype)
H=W=512
yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
feat = torch.cat([torch.stack([yy, xx])[None] / ECCV_SIGMA_XY, img.float() / ECCV_SIGMA_RGB], 1).contiguous()
vertex, bary, nb = torch.ops.segops.permutohedral_lattice(feat)
print(vertex.shape, nb.shape)
def qf(): return torch.ops.segops._lattice_quadratic_forms(seg, None, vertex, bary, nb, False, False)
def build(): return torch.ops.segops.permutohedral_lattice(feat)
forms, G, Y = qf()
g = torch.ones_like(forms)
def bwd(): return torch.ops.segops._lattice_quadratic_forms_backward(g, G, Y, vertex, bary, nb, False, seg.dtype)
res = {}
for name, f in [("build", build), ("qf", qf), ("bwd", bwd)]:
    for t in (1, 2):
        res[(name, t)] = []
for r in range(15):
    for name, f in [("build", build), ("qf", qf), ("bwd", bwd)]:
        for t in (1, 2):
            torch.set_num_threads(t)
            t0 = time.perf_counter(); f(); res[(name, t)].append(time.perf_counter() - t0)
for name in ("build", "qf", "bwd"):
    a, b = min(res[(name, 1)]) * 1e3, min(res[(name, 2)]) * 1e3
    print("%-6s 1t %.2f ms  2t %.2f ms  %.2fx" % (name, a, b, a / b))
