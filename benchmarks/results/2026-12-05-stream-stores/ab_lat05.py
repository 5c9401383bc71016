# In-process A/B of an environment switch on the lattice op (ECCV'18 photo, 512^2): VAR=SEGOPS_LATTICE_FOLLOW
# (OFF=0 is the 'off' arm), R rounds at 1 and 2 threads, a 16 MB write before each call; prints the medians.
import os, sys, time, statistics, torch, segops
from segops.bench.crf import photo
from segops.ops.lattice import crf_features
VAR, OFF = os.environ["VAR"], os.environ.get("OFF", "0")
import torch.nn.functional as F
f = crf_features(F.interpolate(photo("astronaut", 512), scale_factor=0.5, mode="nearest"), 15., 40.).view(1, 5, -1)
big = torch.empty(4_000_000)
res = {}
for th in (1, 2):
    torch.set_num_threads(th)
    for r in range(int(os.environ.get("R", "40"))):
        for ab in ("off", "on"):
            if ab == "off": os.environ[VAR] = OFF
            else: os.environ.pop(VAR, None)
            big.add_(1)
            t = time.perf_counter(); torch.ops.segops.permutohedral_lattice(f); res.setdefault((th, ab), []).append(time.perf_counter() - t)
print(" ".join("%dT %s %.3f" % (k[0], k[1], statistics.median(v) * 1e3) for k, v in res.items()))
