import os, sys, time, statistics, torch, segops
from segops.ops import dense_crf_inference
from segops.bench.crf_inference import photo, unaries, BILATERAL
torch.set_num_threads(int(sys.argv[1]))
g = torch.Generator().manual_seed(0)
image, _ = photo(512, g)
im8 = torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()
im = im8.float()
u = torch.from_numpy(unaries(1, 21, 512, seed=0))
yy, xx = torch.meshgrid(torch.arange(512.), torch.arange(512.), indexing="ij")
f = torch.cat([torch.stack([xx, yy])[None] / 80, im / 13], 1)
lat = lambda: torch.ops.segops.permutohedral_lattice(f)
inf = lambda: dense_crf_inference(u, im8, 5, 3.0, 0.0, *BILATERAL)
for name, fn, reps in [("lattice", lat, 30), ("inference", inf, 12)]:
    ts = {"0": [], "1": []}
    for r in range(reps):
        for mode in ("0", "1"):
            os.environ["SEGOPS_LATTICE_SHARED_BUILD"] = mode
            t0 = time.perf_counter(); fn(); ts[mode].append((time.perf_counter() - t0) * 1e3)
    print(name, "threads", sys.argv[1], "range build %.2f ms, shared build %.2f ms" % (statistics.median(ts["0"]), statistics.median(ts["1"])))
