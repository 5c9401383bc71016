import sys, json, os, tempfile, torch, collections
TRACE = os.path.join(tempfile.mkdtemp(), "trace.json")
from torch.profiler import profile, ProfilerActivity
from segops.bench.crf import ECCV_SIGMA_RGB, ECCV_SIGMA_XY, ECCV_WEIGHT, K, photo
from segops.nn import DenseCRFLoss
th = int(sys.argv[1]); scale = float(sys.argv[2])
torch.set_num_threads(th)
img = photo("astronaut", 512)
seg = torch.softmax(torch.randn(1, K, 512, 512, generator=torch.Generator().manual_seed(0)), 1).requires_grad_()
loss = DenseCRFLoss(weight=ECCV_WEIGHT, sigma_rgb=ECCV_SIGMA_RGB, sigma_xy=ECCV_SIGMA_XY, scale_factor=scale)
def step():
    seg.grad = None; loss(img, seg).backward()
for _ in range(10): step()
N = 30
with profile(activities=[ProfilerActivity.CPU]) as p:
    for _ in range(N):
        with torch.profiler.record_function("STEP"):
            step()
p.export_chrome_trace(TRACE)
ev = [e for e in json.load(open(TRACE))["traceEvents"] if e.get("ph") == "X"]
steps = sorted([e for e in ev if e["name"] == "STEP"], key=lambda e: e["ts"])
# leaf-ish: segops_kernel::* scopes and aten ops without children in kernel scopes
kern = [e for e in ev if e["name"].startswith("segops_kernel::") or e["name"] in ("aten::div","aten::sum","aten::copy_","aten::fill_","aten::mul","segops::_half_resolution_backward")]
gap_tot = collections.Counter(); tot = 0; kt = collections.Counter()
for s in steps:
    a, b = s["ts"], s["ts"] + s["dur"]; tot += s["dur"]
    ks = sorted([e for e in kern if a <= e["ts"] < b and e["tid"] == s["tid"]], key=lambda e: e["ts"])
    # merge nested intervals
    cov = 0; end = a; prev = "start"
    for e in ks:
        st, en = e["ts"], e["ts"] + e["dur"]
        if st > end: gap_tot["before " + e["name"][:40] + " after " + prev[:40]] += st - end
        if en > end:
            cov += en - max(st, end); end = en; prev = e["name"]
        kt[e["name"]] += e["dur"]
    gap_tot["end after " + prev[:40]] += b - end
n = len(steps)
print("step %.3f ms; gaps total %.3f ms" % (tot / n / 1e3, sum(gap_tot.values()) / n / 1e3))
for k, v in gap_tot.most_common(14): print("  gap %.3f  %s" % (v / n / 1e3, k))
