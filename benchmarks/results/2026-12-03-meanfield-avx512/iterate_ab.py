import sys, time, statistics, torch
from segops.ops.crf_inference import MeanFieldCRF
from segops.bench.crf_inference import photo, unaries, BILATERAL
torch.set_num_threads(int(sys.argv[1]))
g = torch.Generator().manual_seed(0)
image, _ = photo(512, g)
u = torch.from_numpy(unaries(1, 21, 512, seed=0))
im = torch.from_numpy(image).permute(2, 0, 1)[None].contiguous().float()
crf = MeanFieldCRF(u)
crf.add_pairwise_bilateral(BILATERAL[0], BILATERAL[1], im, BILATERAL[2])
fused = crf._fused_cpu_terms()
f = lambda: torch.ops.segops._crf_mean_field_iterate(crf.unary, *fused, 5)
for _ in range(3): f()
ts = []
for _ in range(20):
    t0 = time.perf_counter(); f(); ts.append((time.perf_counter() - t0) * 1e3)
print("%.1f" % statistics.median(ts))
