import os, time, torch, statistics
from segops.ops import dense_crf_inference
from segops.bench.crf_inference import photo, unaries
torch.set_num_threads(int(os.environ.get("T", "1")))
var = os.environ.get("VAR", "NOPF")
image, _ = photo(512, torch.Generator().manual_seed(0))
u = torch.from_numpy(unaries(1, 21, 512, seed=0))
im = torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()
op = lambda: dense_crf_inference(u, im, 10, 3.0, 3.0, 121.0, 5.0, 4.0)
A, B = [], []
for i in range(int(os.environ.get("R", "12"))):
    for on, L in ((1, A), (0, B)):
        if on: os.environ[var] = "1"
        else: os.environ.pop(var, None)
        t0 = time.perf_counter(); op(); L.append((time.perf_counter() - t0) * 1e3)
A, B = A[2:], B[2:]
r = sorted(y / x for x, y in zip(A, B))
print("DeepLab %s set: min %.1f med %.1f | unset: min %.1f med %.1f | unset/set median ratio %.3f" % (var, min(A), statistics.median(A), min(B), statistics.median(B), r[len(r)//2]))
