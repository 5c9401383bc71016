import time, statistics, torch, segops
from segops.ops import dense_crf_inference
from segops.ops.crf_inference import MeanFieldCRF
from segops.bench.crf_inference import photo, unaries, BILATERAL
g = torch.Generator().manual_seed(0)
image, _ = photo(512, g)
u = torch.from_numpy(unaries(1, 21, 512, seed=0))
im8 = torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()
im = im8.float()
yy, xx = torch.meshgrid(torch.arange(512.), torch.arange(512.), indexing="ij")
f = torch.cat([torch.stack([xx, yy])[None] / 80, im / 13], 1)
crf = MeanFieldCRF(u)
crf.add_pairwise_bilateral(BILATERAL[0], BILATERAL[1], im, BILATERAL[2])
fused = crf._fused_cpu_terms()
fns = {"lattice": lambda: torch.ops.segops.permutohedral_lattice(f),
       "iterate": lambda: torch.ops.segops._crf_mean_field_iterate(crf.unary, *fused, 5),
       "full": lambda: dense_crf_inference(u, im8, 5, 3.0, 0.0, *BILATERAL)}
ts = {}
for r in range(12):
    for th in (1, 2):
        torch.set_num_threads(th)
        for name, fn in fns.items():
            if r == 0: fn()
            t0 = time.perf_counter(); fn(); ts.setdefault((name, th), []).append((time.perf_counter() - t0) * 1e3)
for name in fns:
    a, b = statistics.median(ts[(name, 1)]), statistics.median(ts[(name, 2)])
    print("%-8s 1 thread %.1f ms, 2 threads %.1f ms, %.2fx" % (name, a, b, a / b))
