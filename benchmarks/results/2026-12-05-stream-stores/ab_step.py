# In-process A/B of an env switch on the whole DenseCRFLoss / NormalizedCutLoss step (ECCV'18 photo 512^2).
# VAR, OFF (off arm value), R rounds, SCALE, LOSS=crf|ncut, B (the photo repeated), SOFTMAX=1 (the step starts from
# logits: softmax, loss, gradient to the logits). Each timed step follows an untimed one of the same arm.
import os, sys, time, statistics, torch
from segops.bench.crf import ECCV_SIGMA_RGB, ECCV_SIGMA_XY, ECCV_WEIGHT, K, photo
from segops.nn import DenseCRFLoss, NormalizedCutLoss
VAR, OFF = os.environ["VAR"], os.environ.get("OFF", "0")
scale = float(os.environ.get("SCALE", "1"))
B = int(os.environ.get("B", "1"))
img = photo("astronaut", 512).expand(B, -1, -1, -1).contiguous()
logits = torch.randn(B, K, 512, 512, generator=torch.Generator().manual_seed(0))
SOFTMAX = os.environ.get("SOFTMAX") == "1"
seg = (logits if SOFTMAX else torch.softmax(logits, 1)).requires_grad_()
if os.environ.get("LOSS", "crf") == "crf":
    loss = DenseCRFLoss(weight=ECCV_WEIGHT, sigma_rgb=ECCV_SIGMA_RGB, sigma_xy=ECCV_SIGMA_XY, scale_factor=scale)
else:
    loss = NormalizedCutLoss(weight=1.0, sigma_rgb=ECCV_SIGMA_RGB, sigma_xy=ECCV_SIGMA_XY, scale_factor=scale)
def step():
    seg.grad = None; loss(img, torch.softmax(seg, 1) if SOFTMAX else seg).backward()
res = {}
for th in (1, 2):
    torch.set_num_threads(th)
    for r in range(int(os.environ.get("R", "30"))):
        for ab in (("off", "on") if r % 2 == 0 else ("on", "off")):
            if ab == "off": os.environ[VAR] = OFF
            else: os.environ.pop(VAR, None)
            step()
            t = time.perf_counter(); step(); res.setdefault((th, ab), []).append(time.perf_counter() - t)
m = {k: statistics.median(v) * 1e3 for k, v in res.items()}
print(" ".join("%dT %s %.2f" % (k[0], k[1], v) for k, v in m.items()),
      "| ratio off %.3f on %.3f" % (m[(1, "off")] / m[(2, "off")], m[(1, "on")] / m[(2, "on")]))
