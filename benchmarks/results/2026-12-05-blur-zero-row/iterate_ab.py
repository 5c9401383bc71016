import os, time, torch, statistics, sys
from segops.bench.crf_inference import photo, unaries
torch.set_num_threads(int(os.environ.get("T", "1")))
var = os.environ.get("VAR", "NORANGE")
image, _ = photo(512, torch.Generator().manual_seed(0))
im = torch.from_numpy(image).permute(2, 0, 1)[None].float()
ys, xs = torch.meshgrid(torch.arange(512.), torch.arange(512.), indexing="ij")
f = torch.cat([torch.stack([xs / 80, ys / 80])[None], im / 13], 1).contiguous()
v, b, n = torch.ops.segops.permutohedral_lattice(f)
u = torch.from_numpy(unaries(1, 21, 512, seed=0))
op = lambda: torch.ops.segops._crf_mean_field_iterate(u, [v], [b], [n], [3], [10.0], 5)
A, B = [], []
for i in range(int(os.environ.get("R", "40"))):
    for on, L in ((1, A), (0, B)):
        if on: os.environ[var] = "1"
        else: os.environ.pop(var, None)
        t0 = time.perf_counter(); op(); L.append((time.perf_counter() - t0) * 1e3)
A, B = A[3:], B[3:]
r = sorted(y / x for x, y in zip(A, B))
print("%s set: min %.2f med %.2f | unset: min %.2f med %.2f | unset/set median ratio %.3f" % (var, min(A), statistics.median(A), min(B), statistics.median(B), r[len(r)//2]))
