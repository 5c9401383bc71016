# The crf suite's "threads 2 vs 1" rows alone: DenseCRFLoss / NormalizedCutLoss forward + backward on the ECCV'18
# workload (astronaut 512², K = 21, B = 1), 1- and 2-thread calls alternated (segops.bench.thread_scaling, 15 rounds),
# with a matmul's ratio from the same rounds.
import torch
from segops.bench import thread_scaling
from segops.bench.crf import ECCV_SIGMA_RGB, ECCV_SIGMA_XY, ECCV_WEIGHT, K, _segmentation, _step, photo
from segops.nn import DenseCRFLoss, NormalizedCutLoss
img = photo("astronaut", 512)
seg = _segmentation(1, 512, 512, torch.Generator().manual_seed(0), torch.device("cpu"))
for cls in (DenseCRFLoss, NormalizedCutLoss):
    for scale in (1.0, 0.5):
        sc = thread_scaling(_step(cls(ECCV_WEIGHT, ECCV_SIGMA_RGB, ECCV_SIGMA_XY, scale), img, seg), 15)
        print("%-18s scale %-3g 1 thread %5.1f ms (median %5.1f), 2 threads %5.1f (median %5.1f): %.2fx; matmul %.2fx" % (
            cls.__name__, scale, sc["threads_1_ms"], sc["threads_1_median_ms"], sc["threads_2_ms"],
            sc["threads_2_median_ms"], sc["speedup"], sc["gemm_speedup"]))
