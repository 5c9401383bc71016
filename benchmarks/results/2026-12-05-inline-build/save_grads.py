import torch, sys, segops
from segops.bench.crf import ECCV_SIGMA_RGB, ECCV_SIGMA_XY, ECCV_WEIGHT, K, photo
from segops.nn import DenseCRFLoss, NormalizedCutLoss
from segops.ops import permutohedral_filter
from segops.reference_lattice import crf_features
out = []
img = photo("astronaut", 512)
for T in (1, 2):
    torch.set_num_threads(T)
    for dt in (torch.float32, torch.float64):
        g = torch.Generator().manual_seed(0)
        seg = torch.softmax(torch.randn(1, K, 512, 512, generator=g), 1).to(dt).requires_grad_()
        for cls in (DenseCRFLoss, NormalizedCutLoss):
            for scale in (1.0, 0.5):
                seg.grad = None
                l = cls(ECCV_WEIGHT, ECCV_SIGMA_RGB, ECCV_SIGMA_XY, scale)(img, seg)
                l.backward()
                out += [l.detach(), seg.grad.clone()]
        feats = crf_features(img.float(), sigma_rgb=13.0, sigma_xy=80.0)
        x = seg.detach()[:, :5].contiguous()
        y = permutohedral_filter(x, feats.to(dt))
        out.append(y)
        x2 = seg.detach()[:, :5, :, :300].contiguous()  # odd width: tile remainders
        out.append(permutohedral_filter(x2, feats[..., :300].contiguous().to(dt)))
torch.save(out, sys.argv[1])
