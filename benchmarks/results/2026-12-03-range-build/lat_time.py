import sys, time, statistics, torch, segops
from segops.bench.crf_inference import photo
torch.set_num_threads(int(sys.argv[1]))
g = torch.Generator().manual_seed(0)
image, _ = photo(512, g)
im = torch.from_numpy(image).permute(2, 0, 1)[None].float()
yy, xx = torch.meshgrid(torch.arange(512.), torch.arange(512.), indexing="ij")
f = torch.cat([torch.stack([xx, yy])[None] / 80, im / 13], 1)
for _ in range(3): torch.ops.segops.permutohedral_lattice(f)
ts = []
for _ in range(30):
    t0 = time.perf_counter(); torch.ops.segops.permutohedral_lattice(f); ts.append((time.perf_counter() - t0) * 1e3)
print("med %.2f min %.2f" % (statistics.median(ts), min(ts)), end=" ")
