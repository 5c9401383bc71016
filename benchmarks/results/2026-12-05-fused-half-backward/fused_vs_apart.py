import torch, segops
from segops.ops import crf_losses as CL
from segops.ops.lattice import crf_features
ops = torch.ops.segops
torch.manual_seed(0)
def unfused_grad(name, img, seg, roi, degree, exact, w):
    # the old path: half_resolution op, then forms with autograd
    s = seg.detach().clone().requires_grad_()
    H2, W2 = img.shape[2]//2*2, img.shape[3]//2*2
    im = img[:, :, 0:H2:2, 0:W2:2]
    r = None if roi is None else roi[:, 0:H2:2, 0:W2:2].to(seg.dtype).unsqueeze(1)
    feats = crf_features(im, 15.0, 40.0).to(CL._acc_dtype(seg.dtype))
    x = CL.half_resolution(s)
    if r is not None: x = x * r
    forms = CL._forms(name, feats, x, r if degree else None, degree, exact)
    (forms * w).sum().backward()
    return s.grad, forms
def fused_grad(name, img, seg, roi, degree, exact, w):
    s = seg.detach().clone().requires_grad_()
    H2, W2 = img.shape[2]//2*2, img.shape[3]//2*2
    im = img[:, :, 0:H2:2, 0:W2:2]
    r = None if roi is None else roi[:, 0:H2:2, 0:W2:2].to(seg.dtype).unsqueeze(1).contiguous()
    feats = crf_features(im, 15.0, 40.0).to(CL._acc_dtype(seg.dtype))
    forms = CL._forms(name, feats, CL._HalfOf(s, r), r if degree else None, degree, exact)
    (forms * w).sum().backward()
    return s.grad, forms
for (H, W) in [(64, 64), (65, 66), (66, 67), (67, 67), (40, 9)]:
  for dtype in (torch.float32, torch.float64, torch.bfloat16):
    for roi_on in (False, True):
      for degree, exact in ((False, False), (True, True)):
        B, K = 2, 5
        img = torch.rand(B, 3, H, W) * 255
        seg = torch.softmax(torch.randn(B, K, H, W), 1).to(dtype)
        roi = (torch.rand(B, H, W) > 0.3).float() if roi_on else None
        w = torch.randn(B, K, 2, dtype=torch.float64)
        g0, f0 = unfused_grad("x", img, seg, roi, degree, exact, w)
        g1, f1 = fused_grad("x", img, seg, roi, degree, exact, w)
        ok = torch.equal(g0, g1) and torch.equal(f0, f1)
        if not ok: print("MISMATCH", H, W, dtype, roi_on, degree, (g0-g1).abs().max())
print("done")
