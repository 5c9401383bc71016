# In-process A/B of an env switch on the CRF loss's backward slice alone (ECCV'18 photo 512^2, K = 21):
# ops._lattice_quadratic_forms_backward, a 16 MB write before each call; medians of R.
import os, time, statistics, torch, segops
from segops.bench.crf import ECCV_SIGMA_RGB, ECCV_SIGMA_XY, K, photo
from segops.ops.lattice import crf_features
VAR, OFF = os.environ["VAR"], os.environ.get("OFF", "0")
ops = torch.ops.segops
f = crf_features(photo("astronaut", 512), ECCV_SIGMA_RGB, ECCV_SIGMA_XY)
x = torch.softmax(torch.randn(1, K, 512, 512, generator=torch.Generator().manual_seed(0)), 1)
v, b, nb = ops.permutohedral_lattice.default(f)
forms, sp, bl = ops._lattice_quadratic_forms.default(x, None, v, b, nb, False, False)
gf = torch.full_like(forms, -2e-9)
big = torch.empty(4_000_000)
res = {}
for th in (1, 2):
    torch.set_num_threads(th)
    for r in range(int(os.environ.get("R", "40"))):
        for ab in (("off", "on") if r % 2 == 0 else ("on", "off")):
            if ab == "off": os.environ[VAR] = OFF
            else: os.environ.pop(VAR, None)
            big.add_(1)
            t = time.perf_counter(); g = ops._lattice_quadratic_forms_backward.default(gf, sp[:0], bl, v, b, nb, False, x.dtype)
            res.setdefault((th, ab), []).append(time.perf_counter() - t); del g
print(" ".join("%dT %s %.3f" % (k[0], k[1], statistics.median(v) * 1e3) for k, v in res.items()))
