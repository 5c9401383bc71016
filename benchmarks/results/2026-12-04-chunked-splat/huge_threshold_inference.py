# Experimental: needs a build whose huge-page threshold (in 2 MiB units) is read from SEGOPS_HT (not in the tree).
import torch, time, os, statistics, segops
from segops.bench.crf_inference import photo, unaries
image, _ = photo(512, torch.Generator().manual_seed(0))
im = torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()
u = torch.from_numpy(unaries(1, 21, 512, seed=0))
f = lambda: segops.ops.dense_crf_inference(u, im, 5, 3.0, 0.0, 80.0, 13.0, 10.0)
res = {}
for i in range(12):
    for t in (1, 2):
        torch.set_num_threads(t)
        t0 = time.perf_counter(); f(); res.setdefault(t, []).append(time.perf_counter() - t0)
print("HT=%s inference: 1t min %.2f med %.2f | 2t min %.2f med %.2f" % (os.environ.get("SEGOPS_HT", "4"),
      min(res[1])*1e3, statistics.median(res[1])*1e3, min(res[2])*1e3, statistics.median(res[2])*1e3))
