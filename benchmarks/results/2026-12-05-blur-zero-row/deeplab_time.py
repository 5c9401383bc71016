# DeepLab's setting (astronaut 512², K = 21, gaussian (3, 3) + bilateral (121, 5, 4), 10 iterations), one thread:
# min / median of 8 calls of dense_crf_inference after a warm-up. For process-alternated A/B with alt.sh.
import time, statistics, torch
from segops.ops import dense_crf_inference
from segops.bench.crf_inference import photo, unaries
torch.set_num_threads(1)
image, _ = photo(512, torch.Generator().manual_seed(0))
u = torch.from_numpy(unaries(1, 21, 512, seed=0))
im = torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()
op = lambda: dense_crf_inference(u, im, 10, 3.0, 3.0, 121.0, 5.0, 4.0)
op()
ts = []
for _ in range(8):
    t0 = time.perf_counter(); op(); ts.append((time.perf_counter() - t0) * 1e3)
print("deeplab min %.1f med %.1f ms" % (min(ts), statistics.median(ts)))
