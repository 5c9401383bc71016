import sys, time, statistics, torch
import torch.nn.functional as F
from segops.models import get_model, to_torch_layers, freeze_bn
from segops.bench.models import _step
torch.set_num_threads(2)
name, hw, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
m = get_model(name, num_classes=21, width=0.25)
m.train(); freeze_bn(m)
t = to_torch_layers(m); t.train(); freeze_bn(t)
x = torch.randn(2, 3, hw, hw); y = torch.randint(0, 21, (2, hw, hw))
v = {"torch": _step(t, x, y), "auto": _step(m, x, y, "auto"), "vendor": _step(m, x, y, "vendor")}
for f in v.values(): f(); f()
ts = {k: [] for k in v}
for r in range(rounds):
    for k, f in v.items():
        t0 = time.perf_counter(); f(); ts[k].append(time.perf_counter() - t0)
med = {k: statistics.median(x) for k, x in ts.items()}
mn = {k: min(x) for k, x in ts.items()}
print("%s %d: median ms torch %.1f auto %.1f vendor %.1f | auto %.2fx vendor %.2fx (medians) | %.2fx %.2fx (mins)" % (
    name, hw, med["torch"]*1e3, med["auto"]*1e3, med["vendor"]*1e3, med["torch"]/med["auto"], med["torch"]/med["vendor"],
    mn["torch"]/mn["auto"], mn["torch"]/mn["vendor"]))
