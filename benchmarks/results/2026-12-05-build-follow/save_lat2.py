# Saves the lattices (vertex ids, weights, neighbours) of two photos and their batch of 3, four bandwidth settings,
# 1-4 threads, float32 / float64, to argv[1]: compared across builds with same.py.
import torch, sys, segops
from segops.bench.crf import ECCV_SIGMA_RGB, ECCV_SIGMA_XY, photo
from segops.reference_lattice import crf_features
out = []
imgs = [photo(n, 512) for n in ("astronaut", "coffee")]
for T in (1, 2, 3, 4):
    torch.set_num_threads(T)
    for img in imgs + [torch.cat(imgs + imgs[:1])]:
        for srgb, sxy in ((ECCV_SIGMA_RGB, ECCV_SIGMA_XY), (5.0, 3.0), (13.0, 80.0), (1.0, 0.5)):
            feats = crf_features(img.float(), sigma_rgb=srgb, sigma_xy=sxy)
            out.append(torch.ops.segops.permutohedral_lattice(feats))
            if T < 3: out.append(torch.ops.segops.permutohedral_lattice(feats.double()))
torch.save(out, sys.argv[1])
