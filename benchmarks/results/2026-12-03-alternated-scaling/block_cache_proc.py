# One process, one setting of SEGOPS_CPU_BLOCK_CACHE_MB (set by the caller): the ECCV'18 DenseCRFLoss step
# (astronaut 512², K = 21, scale 1, forward + backward) and dense CRF inference (512², K = 21, 5 iterations),
# 25 calls each on 1 then 2 threads after 3 warm-up calls: min / median ms. Run alternately with the cache on and
# off, e.g. for i in 1 2 3 4; do for mb in 256 0; do SEGOPS_CPU_BLOCK_CACHE_MB=$mb python block_cache_proc.py; done; done
import os, statistics, time, torch
from segops.bench.crf import ECCV_SIGMA_RGB, ECCV_SIGMA_XY, ECCV_WEIGHT, _segmentation, _step, photo
from segops.bench.crf_inference import BILATERAL, unaries
from segops.nn import DenseCRFLoss
from segops.ops import dense_crf_inference
img = photo("astronaut", 512)
seg = _segmentation(1, 512, 512, torch.Generator().manual_seed(0), torch.device("cpu"))
u = torch.from_numpy(unaries(1, 21, 512, seed=0))
im8 = img.round().to(torch.uint8)
jobs = {"loss": _step(DenseCRFLoss(ECCV_WEIGHT, ECCV_SIGMA_RGB, ECCV_SIGMA_XY, 1.0), img, seg),
        "inference": lambda: dense_crf_inference(u, im8, 5, 3.0, 0.0, *BILATERAL)}
row = ["cache %s MiB:" % os.environ.get("SEGOPS_CPU_BLOCK_CACHE_MB", "256")]
for name, job in jobs.items():
    for th in (1, 2):
        torch.set_num_threads(th)
        ts = []
        for i in range(28):
            t0 = time.perf_counter()
            job()
            if i >= 3:
                ts.append((time.perf_counter() - t0) * 1e3)
        row.append("%s %dt %.1f/%.1f" % (name, th, min(ts), statistics.median(ts)))
print(" ".join(row), flush=True)
