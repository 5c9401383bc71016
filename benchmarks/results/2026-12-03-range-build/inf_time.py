import sys, time, statistics, torch, segops
from segops.ops import dense_crf_inference
from segops.bench.crf_inference import photo, unaries, BILATERAL
torch.set_num_threads(int(sys.argv[1]))
g = torch.Generator().manual_seed(0)
image, _ = photo(512, g)
u = torch.from_numpy(unaries(1, 21, 512, seed=0))
im = torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()
f = lambda: dense_crf_inference(u, im, 5, 3.0, 0.0, *BILATERAL)
for _ in range(3): f()
ts = []
for _ in range(12):
    t0 = time.perf_counter(); r = f(); ts.append((time.perf_counter() - t0) * 1e3)
if len(sys.argv) > 2: torch.save(r, sys.argv[2])
print("med %.1f min %.1f" % (statistics.median(ts), min(ts)), end=" ")
