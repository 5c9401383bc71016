import sys, torch
from segops.nn import DenseCRFLoss
from segops.bench.crf import ECCV_SIGMA_RGB, ECCV_SIGMA_XY, ECCV_WEIGHT, K, photo
img = photo("astronaut", 512)
g = torch.Generator().manual_seed(0)
logits = torch.randn(1, K, 512, 512, generator=g)
loss = DenseCRFLoss(weight=ECCV_WEIGHT, sigma_rgb=ECCV_SIGMA_RGB, sigma_xy=ECCV_SIGMA_XY, scale_factor=1.0)
def step():
    x = logits.clone().requires_grad_()
    seg = torch.softmax(x, 1)
    l = loss(img, seg)
    l.backward()
res = {}
for t in (1, 2, 1, 2):
    torch.set_num_threads(t)
    for _ in range(3): step()
    with torch.profiler.profile() as p:
        for _ in range(5): step()
    for e in p.key_averages():
        if e.key.startswith("segops_kernel::") or e.key in ("aten::_softmax", "aten::_softmax_backward_data"):
            res.setdefault(e.key, {}).setdefault(t, []).append(e.self_cpu_time_total / 5e3)
    tot = sum(e.self_cpu_time_total for e in p.key_averages()) / 5e3
    res.setdefault("TOTAL self", {}).setdefault(t, []).append(tot)
for k, v in sorted(res.items(), key=lambda kv: -min(kv[1].get(1, [0]))):
    print("%-40s 1t %s  2t %s" % (k, " ".join("%.2f" % x for x in v.get(1, [])), " ".join("%.2f" % x for x in v.get(2, []))))
