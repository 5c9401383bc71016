# python loop_step.py THREADS SCALE STEPS: DenseCRFLoss steps (ECCV workload) for perf record.
import time, torch, sys
from segops.bench.crf import ECCV_SIGMA_RGB, ECCV_SIGMA_XY, ECCV_WEIGHT, K, photo
from segops.nn import DenseCRFLoss
torch.set_num_threads(int(sys.argv[1])); scale = float(sys.argv[2])
img = photo("astronaut", 512)
seg = torch.softmax(torch.randn(1, K, 512, 512, generator=torch.Generator().manual_seed(0)), 1).requires_grad_()
loss = DenseCRFLoss(weight=ECCV_WEIGHT, sigma_rgb=ECCV_SIGMA_RGB, sigma_xy=ECCV_SIGMA_XY, scale_factor=scale)
for _ in range(int(sys.argv[3])):
    seg.grad = None; loss(img, seg).backward()
