import sys, time, statistics, torch, torch.nn.functional as F
from segops import ops
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
shapes = [(4, 512, 256, 33, 6), (4, 512, 256, 33, 12), (1, 512, 256, 65, 12), (1, 512, 1024, 33, 12)]
if len(sys.argv) > 1: shapes = [shapes[int(i)] for i in sys.argv[1].split(",")]
for B, cin, cout, hw, r in shapes:
    x = torch.randn(B, cin, hw, hw, generator=g)
    w = torch.randn(cout, cin, 3, 3, generator=g) * 0.02
    b = torch.randn(cout, generator=g)
    go = torch.randn(B, cout, hw, hw, generator=g)
    seg_b = torch.ops.segops._atrous_conv2d_backward
    f = {
      ("fwd", "torch"): lambda: F.conv2d(x, w, b, 1, r, r),
      ("fwd", "segops"): lambda: ops.atrous_conv2d(x, w, b, 1, r, r, backend="segops"),
      ("dx", "torch"): lambda: torch.ops.aten.convolution_backward(go, x, w, [cout], [1,1], [r,r], [r,r], False, [0,0], 1, [True, False, False]),
      ("dw", "torch"): lambda: torch.ops.aten.convolution_backward(go, x, w, [cout], [1,1], [r,r], [r,r], False, [0,0], 1, [False, True, True]),
    }
    import inspect
    # segops backward op: find route for segops rows
    with torch.no_grad():
        for part, mask in (("dx", [True, False, False]), ("dw", [False, True, True])):
            f[(part, "segops")] = (lambda mask=mask: seg_b(go, x, w, [1,1], [r,r], [r,r], 1, mask, 0))
    t = {k: [] for k in f}
    with torch.no_grad():
        for k, fn in f.items(): fn(); fn()
        for _ in range(7):
            for k, fn in f.items():
                t0 = time.perf_counter(); fn(); t[k].append(time.perf_counter() - t0)
    line = "B%d %d->%d %d² r%d:" % (B, cin, cout, hw, r)
    for part in ("fwd", "dx", "dw"):
        a, s = statistics.median(t[(part, "torch")]) * 1e3, statistics.median(t[(part, "segops")]) * 1e3
        line += "  %s torch %.1f segops %.1f (%.2fx)" % (part, a, s, a / s)
    print(line, flush=True)
