import torch, sys, segops
from segops.bench.crf import ECCV_SIGMA_RGB, ECCV_SIGMA_XY, photo
from segops.reference_lattice import crf_features
out = []
for T in (1, 2):
    torch.set_num_threads(T)
    for name in ("astronaut", "coffee"):
        img = photo(name, 512)
        for srgb, sxy in ((ECCV_SIGMA_RGB, ECCV_SIGMA_XY), (5.0, 3.0), (13.0, 80.0)):
            feats = crf_features(img.float(), sigma_rgb=srgb, sigma_xy=sxy)
            out.append(torch.ops.segops.permutohedral_lattice(feats))
            out.append(torch.ops.segops.permutohedral_lattice(feats.double()))
torch.save(out, sys.argv[1])
