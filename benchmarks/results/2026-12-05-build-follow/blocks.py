# DenseCRFLoss (ECCV'18 workload, scale argv[1]) on 1 and 2 threads alternated: per call (block 1), in blocks of 4
# after an untimed call (block 4), and one untimed + one timed call per switch (block -1); medians.
import time, statistics, torch, sys
from segops.bench.crf import ECCV_SIGMA_RGB, ECCV_SIGMA_XY, ECCV_WEIGHT, K, photo
from segops.nn import DenseCRFLoss
img = photo("astronaut", 512)
seg = torch.softmax(torch.randn(1, K, 512, 512, generator=torch.Generator().manual_seed(0)), 1).requires_grad_()
loss = DenseCRFLoss(ECCV_WEIGHT, ECCV_SIGMA_RGB, ECCV_SIGMA_XY, float(sys.argv[1]) if len(sys.argv) > 1 else 1.0)
def step():
    seg.grad = None
    loss(img, seg).backward()
def run(block, rounds):
    times = {1: [], 2: []}
    for _ in range(rounds):
        for t in (1, 2):
            torch.set_num_threads(t)
            for j in range(abs(block) + (1 if block != 1 else 0)):
                t0 = time.perf_counter(); step(); dt = time.perf_counter() - t0
                if block == 1 or j > 0: times[t].append(dt * 1e3)
    m1, m2 = statistics.median(times[1]), statistics.median(times[2])
    return "block %d: 1T %.2f 2T %.2f (%.2fx)" % (block, m1, m2, m1 / m2)
for _ in range(3): step()
for _ in range(2):
    print(run(1, 20), "|", run(4, 5), "|", run(-1, 20))
