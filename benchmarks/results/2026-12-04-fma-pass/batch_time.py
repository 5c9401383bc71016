# B = 8 photo crops at 256² (astronaut / coffee), K = 21, one bilateral kernel (80, 13, 10), 5 iterations: the iterate op
# alone (lattice built beforehand), min of 12 calls; T = threads (default 1).
import os, time, torch, numpy as np
import segops
from skimage import data
torch.set_num_threads(int(os.environ.get("T", "1")))
ims = []
for name in ("astronaut", "coffee"):
    im = getattr(data, name)()
    for (t, l) in ((0, 0), (100, 100), (144, 50), (120, 200)):
        ims.append(torch.from_numpy(np.ascontiguousarray(im[t:t + 256, l:l + 256, :3])).permute(2, 0, 1).float())
im = torch.stack(ims)
B = im.shape[0]
ys, xs = torch.meshgrid(torch.arange(256.), torch.arange(256.), indexing="ij")
f = torch.cat([torch.stack([xs / 80, ys / 80])[None].expand(B, 2, 256, 256), im / 13], 1).contiguous()
v, b, n = torch.ops.segops.permutohedral_lattice(f)
u = torch.rand(B, 21, 256, 256, generator=torch.Generator().manual_seed(0)) * 3
op = lambda: torch.ops.segops._crf_mean_field_iterate(u, [v], [b], [n], [3], [10.0], 5)
op()
ts = []
for _ in range(12):
    t0 = time.perf_counter(); op(); ts.append((time.perf_counter() - t0) * 1e3)
print("B=8 256^2 T=%s iterate min %.1f ms" % (os.environ.get("T", "1"), min(ts)))
