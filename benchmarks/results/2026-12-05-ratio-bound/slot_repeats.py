import torch, segops
from segops.bench.crf import ECCV_SIGMA_RGB, ECCV_SIGMA_XY, photo
from segops.ops.lattice import crf_features
for s in (1.0, 0.5):
    img = photo("astronaut", 512)
    if s == 0.5: img = img[:, :, ::2, ::2]
    f = crf_features(img, ECCV_SIGMA_RGB, ECCV_SIGMA_XY * s)
    v, b, n = torch.ops.segops.permutohedral_lattice(f)
    v = v[0]
    same = (v[1:] == v[:-1]).float().mean(0)
    anyslot = (v[1:] == v[:-1]).all(1).float().mean()
    print(s, v.shape, "per slot same as previous point:", [round(x,3) for x in same.tolist()], "all 6 same:", round(anyslot.item(),3))
