# Which function the other thread runs while one thread idles in libgomp (perf record -e cpu-clock of loop_step.py,
# two threads): for each idle sample of one thread, the nearest sample (< 0.1 ms) of the other.
import sys, re, bisect, collections, subprocess
data = sys.argv[1]
out = subprocess.run(["perf", "script", "-i", data, "-F", "tid,time,ip,sym,dso"], capture_output=True, text=True).stdout
rows = []
for line in out.splitlines():
    m = re.match(r"\s*(\d+)\s+([\d.]+):\s+(.*)", line)
    if not m: continue
    tid, t, rest = int(m.group(1)), float(m.group(2)), m.group(3).split(None, 1)[1] if len(m.group(3).split(None, 1)) > 1 else ""
    dso = rest[rest.rfind("(") + 1:].rstrip(")").split("/")[-1] if "(" in rest else "?"
    sym = rest[:rest.rfind("(")].strip() if "(" in rest else rest
    if "libgomp" in dso: sym = "[libgomp]"
    sym = sym.replace("segops::(anonymous namespace)::", "").replace("segops::lattice::", "").replace("segops::half_resolution::", "")[:110] if "invoke_parallel" not in sym else "invoke_parallel:" + re.search(r"parallel_for<(.{0,90})", sym).group(1).replace("segops::(anonymous namespace)::", "").replace("segops::lattice::", "") if re.search(r"parallel_for<([^(<]*)", sym) else sym[:90]
    rows.append((tid, t, sym, dso))
cnt = collections.Counter(r[0] for r in rows)
main, worker = [t for t, _ in cnt.most_common(2)]
# steady state: from the first sample in _C plus 0.3 s
t0 = min(r[1] for r in rows if r[3].startswith("_C")) + 0.3
M = sorted((r[1], r[2]) for r in rows if r[0] == main and r[1] > t0)
Wk = sorted((r[1], r[2]) for r in rows if r[0] == worker and r[1] > t0)
def nearest(seq, t):
    i = bisect.bisect_left(seq, (t, ""))
    best = None
    for j in (i - 1, i):
        if 0 <= j < len(seq) and abs(seq[j][0] - t) < 1e-4 and (best is None or abs(seq[j][0] - t) < abs(best[0] - t)): best = seq[j]
    return best
for who, mine, other in (("worker idle -> main in", Wk, M), ("main idle -> worker in", M, Wk)):
    c = collections.Counter()
    n_idle = 0
    for t, s in mine:
        if s != "[libgomp]": continue
        n_idle += 1
        o = nearest(other, t)
        c[o[1] if o else "(no sample)"] += 1
    print("== %s: %d idle samples of %d (%.1f%%)" % (who, n_idle, len(mine), 100 * n_idle / len(mine)))
    for s, k in c.most_common(18): print("  %5d %5.1f%%  %s" % (k, 100 * k / len(mine), s))
