# crf_features written in place (segops.ops.lattice) against the former concatenation, on the ECCV'18 photo at 512^2,
# caches flushed by a 32 MB write before each call; medians of 30, three alternations. Usage: features_time.py THREADS
import sys, time, torch
from segops.bench.crf import photo
from segops.ops.lattice import crf_features
torch.set_num_threads(int(sys.argv[1]))
img = photo("astronaut", 512)
big = torch.empty(8_000_000)
def cat_version():
    B, _, H, W = img.shape
    xs = (torch.arange(W, dtype=torch.float32) / 80.0).view(1, 1, 1, W).expand(B, 1, H, W)
    ys = (torch.arange(H, dtype=torch.float32) / 80.0).view(1, 1, H, 1).expand(B, 1, H, W)
    return torch.cat([xs, ys, img.to(torch.float32) / 15.0], 1)
assert torch.equal(cat_version(), crf_features(img, 15.0, 80.0))
for name, fn in (("cat", cat_version), ("in place", lambda: crf_features(img, 15.0, 80.0))) * 3:
    ts = []
    for _ in range(30):
        big.add_(1)
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    print("%-8s %.3f ms" % (name, sorted(ts)[15] * 1e3))
