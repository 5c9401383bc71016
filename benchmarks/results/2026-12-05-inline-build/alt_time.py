# Medians of one- and two-thread calls, alternated in one process: for ../2026-12-03-range-build/alt.sh, which
# runs it under two builds in turn. CASE=loss (DenseCRFLoss, ECCV'18 workload, scales 1 and 0.5; 15 rounds) or
# CASE=inference (dense_crf_inference, astronaut 512², K = 21, 5 iterations, one bilateral kernel; 12 rounds).
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from crf_inference_scaling import alternated_medians  # noqa: E402


def medians(op, rounds):
    m1, m2 = alternated_medians(op, rounds)
    return "1T %.2f 2T %.2f (%.2fx)" % (m1, m2, m1 / m2)


if os.environ.get("CASE", "loss") == "loss":
    from segops.bench.crf import ECCV_SIGMA_RGB, ECCV_SIGMA_XY, ECCV_WEIGHT, K, photo
    from segops.nn import DenseCRFLoss
    img = photo("astronaut", 512)
    seg = torch.softmax(torch.randn(1, K, 512, 512, generator=torch.Generator().manual_seed(0)), 1).requires_grad_()
    out = []
    for scale in (1.0, 0.5):
        loss = DenseCRFLoss(ECCV_WEIGHT, ECCV_SIGMA_RGB, ECCV_SIGMA_XY, scale)

        def step():
            seg.grad = None
            loss(img, seg).backward()

        out.append("s%.1f %s" % (scale, medians(step, 15)))
    print(" | ".join(out), end=" ")
else:
    from segops.bench.crf_inference import BILATERAL, photo, unaries
    from segops.ops import dense_crf_inference
    image, _ = photo(512, torch.Generator().manual_seed(0))
    u = torch.from_numpy(unaries(1, 21, 512, seed=0))
    im = torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()
    print("infer " + medians(lambda: dense_crf_inference(u, im, 5, 3.0, 0.0, *BILATERAL), 12), end=" ")
