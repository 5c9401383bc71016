# segops' cache of freed large CPU blocks on / off (SEGOPS_CPU_BLOCK_CACHE_MB=256 / 0, read whenever a block is
# freed), alternated in one process by short runs: per round and thread count, three calls with the cache on, then
# the cache emptied and three calls with it off; the first call of each run is not timed (it fills or empties
# the cache): the ECCV'18 loss workload (astronaut 512², K = 21, forward +
# backward) and dense CRF inference (512², K = 21, 5 iterations, bilateral), on 1 and 2 threads.
# Prints min / median ms over the 2 `rounds` timed calls of each.
import os, statistics, sys, time, torch
import segops
from segops.bench.crf import ECCV_SIGMA_RGB, ECCV_SIGMA_XY, ECCV_WEIGHT, _segmentation, _step, photo
from segops.bench.crf_inference import BILATERAL, unaries
from segops.nn import DenseCRFLoss, NormalizedCutLoss
from segops.ops import dense_crf_inference
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 15
img = photo("astronaut", 512)
seg = _segmentation(1, 512, 512, torch.Generator().manual_seed(0), torch.device("cpu"))
u = torch.from_numpy(unaries(1, 21, 512, seed=0))
im8 = img.round().to(torch.uint8)
jobs = {
    "DenseCRFLoss scale 1": _step(DenseCRFLoss(ECCV_WEIGHT, ECCV_SIGMA_RGB, ECCV_SIGMA_XY, 1.0), img, seg),
    "DenseCRFLoss scale 0.5": _step(DenseCRFLoss(ECCV_WEIGHT, ECCV_SIGMA_RGB, ECCV_SIGMA_XY, 0.5), img, seg),
    "NormalizedCutLoss scale 1": _step(NormalizedCutLoss(ECCV_WEIGHT, ECCV_SIGMA_RGB, ECCV_SIGMA_XY, 1.0), img, seg),
    "dense_crf_inference": lambda: dense_crf_inference(u, im8, 5, 3.0, 0.0, *BILATERAL),
}
for name, job in jobs.items():
    ts = {}
    for r in range(rounds + 1):
        for th in (1, 2):
            torch.set_num_threads(th)
            for mb in ("256", "0"):
                os.environ["SEGOPS_CPU_BLOCK_CACHE_MB"] = mb
                segops.empty_cpu_cache()
                for call in range(3):
                    t0 = time.perf_counter()
                    out = job()
                    del out
                    if r > 0 and call > 0:
                        ts.setdefault((th, mb), []).append((time.perf_counter() - t0) * 1e3)
    row = []
    for th in (1, 2):
        a, b = ts[(th, "256")], ts[(th, "0")]
        row.append("%d thread(s): cache %.1f (%.1f) / none %.1f (%.1f)" % (th, min(a), statistics.median(a), min(b), statistics.median(b)))
    c1, c2 = min(ts[(1, "256")]) / min(ts[(2, "256")]), min(ts[(1, "0")]) / min(ts[(2, "0")])
    print("%-26s %s | 2 vs 1: cache %.2fx, none %.2fx" % (name, " | ".join(row), c1, c2), flush=True)
