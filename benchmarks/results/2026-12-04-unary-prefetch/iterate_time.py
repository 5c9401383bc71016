# The one-op mean-field schedule alone (lattice built beforehand): astronaut 512², K = 21, one bilateral kernel
# (sxy 80, srgb 13, compat 10, symmetric normalisation), 5 iterations, one thread; min / first quartile of 15 calls.
# With SAVE=path the marginals are saved; with CMP=path they are compared bit for bit with a saved run.
import os, time, torch
from segops.bench.crf_inference import photo, unaries
torch.set_num_threads(int(os.environ.get("T", "1")))
image, _ = photo(512, torch.Generator().manual_seed(0))
im = torch.from_numpy(image).permute(2, 0, 1)[None].float()
ys, xs = torch.meshgrid(torch.arange(512.), torch.arange(512.), indexing="ij")
f = torch.cat([torch.stack([xs / 80, ys / 80])[None], im / 13], 1).contiguous()
v, b, n = torch.ops.segops.permutohedral_lattice(f)
u = torch.from_numpy(unaries(1, 21, 512, seed=0))
op = lambda: torch.ops.segops._crf_mean_field_iterate(u, [v], [b], [n], [3], [10.0], 5)
out = op()
if os.environ.get("SAVE"):
    torch.save(out, os.environ["SAVE"])
same = "" if not os.environ.get("CMP") else " | bitwise equal to saved: %s" % torch.equal(out, torch.load(os.environ["CMP"]))
ts = []
for _ in range(15):
    t0 = time.perf_counter(); op(); ts.append((time.perf_counter() - t0) * 1e3)
ts.sort()
print("iterate min %.1f q1 %.1f ms%s" % (ts[0], ts[len(ts) // 4], same))
