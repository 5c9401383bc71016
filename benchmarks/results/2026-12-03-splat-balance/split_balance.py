import torch, numpy as np
from segops.bench.crf import ECCV_SIGMA_RGB, ECCV_SIGMA_XY, photo
img = photo("astronaut", 512)
H = W = 512
yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
feats = torch.cat([xx[None, None] / ECCV_SIGMA_XY, yy[None, None] / ECCV_SIGMA_XY, img / ECCV_SIGMA_RGB], 1)
v, w, nb = torch.ops.segops.permutohedral_lattice(feats)
a = v.reshape(-1, 6).numpy(); M = nb.shape[0]; N = a.shape[0]
print("M", M, "N", N)
blk = 256
def stats(splits):
    for t in range(len(splits) - 1):
        lo, hi = splits[t], splits[t + 1]
        inr = (a >= lo) & (a < hi)
        entries = inr.sum()
        rel = inr.any(1).reshape(-1, blk).any(1).sum() if N % blk == 0 else None
        print("  task %d vertices [%d, %d): entries %.0f%%, relevant blocks %d of %d" % (t, lo, hi, 100 * entries / a.size, rel, N // blk))
print("split by vertex count:"); stats([0, M // 2, M])
pm = np.maximum.accumulate(a.max(1))
print("split by points (prefix max):"); stats([0, int(pm[N // 2 - 1]) + 1, M])
