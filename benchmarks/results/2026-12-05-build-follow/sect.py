# One DenseCRFLoss step (ECCV'18 workload) cut into its Python-level sections -- prepare (features), lattice op,
# quadratic forms, backward -- medians of 40 steps at argv[1] threads, scale argv[2] (default 1).
import time, torch, sys
from segops.bench.crf import ECCV_SIGMA_RGB, ECCV_SIGMA_XY, ECCV_WEIGHT, K, photo
from segops.ops import crf_losses as cl
torch.set_num_threads(int(sys.argv[1])); SCALE = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
img = photo("astronaut", 512)
seg = torch.softmax(torch.randn(1, K, 512, 512, generator=torch.Generator().manual_seed(0)), 1).requires_grad_()
ops=torch.ops.segops
import collections
acc=collections.defaultdict(list)
def step():
    t0=time.perf_counter()
    seg.grad=None
    feats,x,_ = cl._prepare("x", img, seg, None, ECCV_SIGMA_RGB, ECCV_SIGMA_XY, SCALE)
    t1=time.perf_counter()
    v,b,nb = ops.permutohedral_lattice.default(feats)
    t2=time.perf_counter()
    f,_,_ = ops._lattice_quadratic_forms.default(x, None, v,b,nb, False, False)
    l = (f.select(2,0).sum()*(-ECCV_WEIGHT)).to(torch.float32)
    t3=time.perf_counter()
    l.backward()
    t4=time.perf_counter()
    for k,a,b_ in (("prep",t0,t1),("lat",t1,t2),("forms",t2,t3),("bwd",t3,t4),("all",t0,t4)): acc[k].append((b_-a)*1e3)
for _ in range(5): step()
acc.clear()
for _ in range(40): step()
print(" ".join("%s %.2f"%(k, sorted(v)[len(v)//2]) for k,v in acc.items()))
