# Per-phase self CPU time of dense_crf_inference (astronaut 512², K = 21, 5 iterations, one bilateral kernel),
# averaged over 10 calls under torch.profiler; T=threads (default 1).
import torch, sys, os
from segops.ops import dense_crf_inference
from segops.bench.crf_inference import photo, unaries, BILATERAL
torch.set_num_threads(int(os.environ.get("T", "1")))
g = torch.Generator().manual_seed(0)
image, _ = photo(512, g)
u = torch.from_numpy(unaries(1, 21, 512, seed=0))
im = torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()
f = lambda: dense_crf_inference(u, im, 5, 3.0, 0.0, *BILATERAL)
for _ in range(3): f()
R = 10
with torch.profiler.profile() as p:
    for _ in range(R): f()
rows = [(e.key, e.self_cpu_time_total / R / 1e3, e.count // R) for e in p.key_averages()]
rows.sort(key=lambda r: -r[1])
tot = sum(r[1] for r in rows)
print("total self %.1f ms per call" % tot)
for k, t, c in rows[:14]: print("%-40s %6.2f ms  x%d" % (k, t, c))
