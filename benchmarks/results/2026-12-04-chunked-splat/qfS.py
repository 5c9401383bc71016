# Experimental: needs a build whose CPU splat reads its chunk count from SEGOPS_S (not in the tree).
import torch, time, os, statistics
exec(open(__import__('os').path.join(__import__('os').path.dirname(__file__), 'splat_ab.py')).read().split("res = {}")[0].replace("print(", "(lambda *a: None)("))
import sys
torch.set_num_threads(int(sys.argv[1]))
ts = {s: [] for s in ("1", "2", "4")}
for i in range(40):
    for s in ts:
        os.environ["SEGOPS_S"] = s
        t0 = time.perf_counter(); qf(); ts[s].append(time.perf_counter() - t0)
print(" ".join("S=%s min %.3f med %.3f" % (k, min(v)*1e3, statistics.median(v)*1e3) for k, v in ts.items()))
