import os, sys, time, statistics, torch
from segops.ops import dense_crf_inference
from segops.bench.crf_inference import photo, unaries, BILATERAL
image, _ = photo(512, torch.Generator().manual_seed(0))
u = torch.from_numpy(unaries(1, 21, 512, seed=0))
im = torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()
op = lambda: dense_crf_inference(u, im, 5, 3.0, 0.0, *BILATERAL)
ts = {1: [], 2: []}
for t in (1, 2):
    torch.set_num_threads(t); op(); op()
for _ in range(12):
    for t in (1, 2):
        torch.set_num_threads(t)
        t0 = time.perf_counter(); op(); ts[t].append((time.perf_counter() - t0) * 1e3)
m1, m2 = statistics.median(ts[1]), statistics.median(ts[2])
print("infer 1T %.2f 2T %.2f (%.2fx)" % (m1, m2, m1 / m2), end=" ")
