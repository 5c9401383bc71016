# (SEGOPS_HR_BASE was a temporary switch in the build measured here, not in the committed code: the committed
# comparison is tests/test_resize.py::test_avx2_rows_same_bits_as_portable, ATEN_CPU_CAPABILITY=default.)
import time, statistics, torch, sys, os
ops = torch.ops.segops
import segops
x = torch.softmax(torch.randn(1, 21, 512, 512, generator=torch.Generator().manual_seed(0)), 1)
g = torch.randn(1, 21, 256, 256, generator=torch.Generator().manual_seed(1))
big = torch.empty(16_000_000)
res = {}
for th in (1, 2):
    torch.set_num_threads(th)
    for r in range(60):
        for ab in (("base", "avx2") if r % 2 else ("avx2", "base")):
            if ab == "base": os.environ["SEGOPS_HR_BASE"] = "1"
            else: os.environ.pop("SEGOPS_HR_BASE", None)
            for name, fn in (("fwd", lambda: ops._half_resolution(x)), ("bwd", lambda: ops._half_resolution_backward(g, [512, 512]))):
                big.add_(1)
                t = time.perf_counter(); y = fn(); res.setdefault((th, name, ab), []).append(time.perf_counter() - t); del y
print(" ".join("%dT %s %s %.3f" % (k + (statistics.median(v) * 1e3,)) for k, v in sorted(res.items())))
