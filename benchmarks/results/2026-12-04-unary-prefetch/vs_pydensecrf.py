import time, statistics, sys, torch, numpy as np
from segops.ops import dense_crf_inference
from segops.bench.crf_inference import photo, unaries, BILATERAL, pydensecrf_program
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
image, _ = photo(512, g)
unary = unaries(1, 21, 512, seed=0)
u = torch.from_numpy(unary)
im = torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()
d = pydensecrf_program(unary[0], image, None, BILATERAL)
ours = lambda: dense_crf_inference(u, im, 5, 3.0, 0.0, *BILATERAL)
peer = lambda: d.inference(5)
def t(f):
    t0 = time.perf_counter(); f(); return (time.perf_counter() - t0) * 1e3
ours(); peer()
mode = sys.argv[1]
A, B = [], []
if mode == "alt":
    for _ in range(10):
        A.append(t(ours)); B.append(t(peer))
else:
    for _ in range(10): A.append(t(ours))
    for _ in range(10): B.append(t(peer))
print(mode, "segops min %.1f med %.1f | pydensecrf2 min %.1f med %.1f | ratio of minima %.2fx" % (min(A), statistics.median(A), min(B), statistics.median(B), min(B) / min(A)))
