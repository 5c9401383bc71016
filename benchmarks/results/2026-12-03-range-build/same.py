import os, torch, segops, sys
from segops.bench.crf_inference import photo
g = torch.Generator().manual_seed(0)
image, _ = photo(512, g)
im = torch.from_numpy(image).permute(2, 0, 1)[None].float()
yy, xx = torch.meshgrid(torch.arange(512.), torch.arange(512.), indexing="ij")
def feats(sxy, srgb, B=1):
    f = torch.cat([torch.stack([xx, yy])[None] / sxy, im / srgb], 1)
    return f.repeat(B, 1, 1, 1) + torch.arange(B).view(B,1,1,1) * 0.37
res = {}
for mode in ("0", "1"):
    os.environ["SEGOPS_LATTICE_SHARED_BUILD"] = mode
    for th in (1, 2):
        torch.set_num_threads(th)
        for (sxy, srgb, B) in [(80, 13, 1), (80, 13, 3), (3, 3, 1), (20, 5, 2)]:
            f = feats(sxy, srgb, B)[:, :5 if srgb != 3 else 2]
            res[(mode, th, sxy, srgb, B)] = torch.ops.segops.permutohedral_lattice(f)
keys = list(res)
ref = {k[2:]: res[k] for k in keys if k[0] == "1" and k[1] == 1}
for k in keys:
    a, r = res[k], ref[k[2:]]
    ok = all(torch.equal(x, y) for x, y in zip(a, r))
    print(k, "M", a[2].shape[0], "same" if ok else "DIFFERENT")
