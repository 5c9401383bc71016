import os, time, torch, statistics
from segops.bench.crf_inference import photo
torch.set_num_threads(int(os.environ.get("T","1")))
image, _ = photo(512, torch.Generator().manual_seed(0))
im = torch.from_numpy(image).permute(2, 0, 1)[None].float()
ys, xs = torch.meshgrid(torch.arange(512.), torch.arange(512.), indexing="ij")
f = torch.cat([torch.stack([xs / 80, ys / 80])[None], im / 13], 1).contiguous()
op = lambda: torch.ops.segops.permutohedral_lattice(f)
A, B = [], []
for i in range(60):
    for v, L in ((1, A), (0, B)):
        if v: os.environ["NO512"] = "1"
        else: os.environ.pop("NO512", None)
        t0 = time.perf_counter(); op(); L.append((time.perf_counter() - t0) * 1e3)
A, B = A[5:], B[5:]
r = sorted(b / a for a, b in zip(A, B))
print("avx2 min %.2f med %.2f | avx512 min %.2f med %.2f | ratio med %.3f" % (min(A), statistics.median(A), min(B), statistics.median(B), r[len(r)//2]))
