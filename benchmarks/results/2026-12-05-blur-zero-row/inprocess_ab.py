# In-process A/B of a temporary environment switch (read by the code under test at each call; the switches of
# this session's notes were removed after their measurement): CASE=iterate (the one-op schedule alone, lattice
# built beforehand), lattice (the 5-d lattice op) or deeplab (the whole inference in DeepLab's setting); one
# thread; calls alternate switch set / unset, R rounds after 3 (deeplab: 2) warm-up rounds.
#   VAR=<switch> CASE=iterate python inprocess_ab.py
import os, statistics, time
import torch
from segops.bench.crf_inference import photo, unaries
from segops.ops import dense_crf_inference
from segops.reference_lattice import crf_features

torch.set_num_threads(1)
var, case = os.environ["VAR"], os.environ.get("CASE", "iterate")
image, _ = photo(512, torch.Generator().manual_seed(0))
images = torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()
u = torch.from_numpy(unaries(1, 21, 512, seed=0))
if case == "deeplab":
    op = lambda: dense_crf_inference(u, images, 10, 3.0, 3.0, 121.0, 5.0, 4.0)
else:
    feats = crf_features(images.float(), sigma_rgb=13.0, sigma_xy=80.0)
    lattice = torch.ops.segops.permutohedral_lattice(feats)
    if case == "lattice":
        op = lambda: torch.ops.segops.permutohedral_lattice(feats)
    else:
        v, b, n = lattice
        op = lambda: torch.ops.segops._crf_mean_field_iterate(u, [v], [b], [n], [3], [10.0], 5)
rounds, warm = int(os.environ.get("R", "12" if case == "deeplab" else "40")), 2 if case == "deeplab" else 3
times = {True: [], False: []}
for _ in range(rounds):
    for on in (True, False):
        if on:
            os.environ[var] = "1"
        else:
            os.environ.pop(var, None)
        t0 = time.perf_counter()
        op()
        times[on].append((time.perf_counter() - t0) * 1e3)
a, b = times[True][warm:], times[False][warm:]
r = sorted(y / x for x, y in zip(a, b))
print("%s %s set: min %.2f med %.2f | unset: min %.2f med %.2f | unset/set median ratio %.3f"
      % (case, var, min(a), statistics.median(a), min(b), statistics.median(b), r[len(r) // 2]))
