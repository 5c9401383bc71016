import os, sys, torch, segops
from segops.bench.crf import photo
from segops.ops.lattice import crf_features
torch.set_num_threads(int(sys.argv[1])); s = float(sys.argv[2])
im = photo("astronaut", 512)
if s == 0.5: im = im[:, :, ::2, ::2]
f = crf_features(im, 15., 80. * s).view(1, 5, -1)
for _ in range(int(sys.argv[3])): torch.ops.segops.permutohedral_lattice(f)
