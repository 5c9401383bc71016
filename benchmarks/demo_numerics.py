"""Why the demo's table depends on the machine, not on the run: a tiny demo setting (pCE + CRF, 32 training
images, one epoch, seed 0) trained in fresh processes, each under another choice of the CPU math libraries'
code paths, with the validation mIoU and a hash of the trained weights::

    python benchmarks/demo_numerics.py

Repeated runs under the same environment give the same hash (the same seed on the same machine gives the same
bits); forcing Intel MKL's conditional-numerical-reproducibility branch (``MKL_CBWR=COMPATIBLE``) or capping
oneDNN at AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``, what a CPU without AVX-512 runs) rounds some sums differently,
and the weights differ after a few steps. Over the demo's 800 steps such differences grow into a different
table: a machine whose libraries pick other kernels prints other (equally valid) numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time

VARIANTS = (
    ("default", {}),
    ("default, again", {}),
    ("MKL_CBWR=COMPATIBLE", {"MKL_CBWR": "COMPATIBLE"}),
    ("ONEDNN_MAX_CPU_ISA=AVX2", {"ONEDNN_MAX_CPU_ISA": "AVX2"}),
    ("ATEN_CPU_CAPABILITY=avx2", {"ATEN_CPU_CAPABILITY": "avx2"}),
)


def train_once(out_dir: str) -> dict:
    """Trains the tiny setting in this process; returns its mIoU, weights hash and CPU time."""
    import torch

    from segops import demo
    from segops.train import train

    torch.set_num_threads(1)
    cfg = demo.demo_config("pce+crf", out_dir, seed=0, epochs=1, train_images=32, val_images=16)
    cfg.progress = False
    cpu0 = time.process_time()
    summary = train(cfg, log=lambda message: None)
    digest = hashlib.sha256()
    for value in summary["model"].state_dict().values():  # type: ignore[union-attr]
        digest.update(value.detach().contiguous().numpy().tobytes())
    return {"miou": float(summary["val"]["miou"]), "weights_sha256": digest.hexdigest()[:16],  # type: ignore[index]
            "cpu_s": time.process_time() - cpu0, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(train_once(a.child)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, env) in enumerate(VARIANTS):
            run = subprocess.run([sys.executable, __file__, "--child", os.path.join(tmp, str(i))], env=dict(os.environ, **env),
                                 capture_output=True, text=True, check=True)
            row = dict(json.loads(run.stdout.strip().splitlines()[-1]), variant=name)
            rows.append(row)
            print("%-26s mIoU %.6f  weights %s  (CPU %.1f s, ATen %s)" % (name, row["miou"], row["weights_sha256"], row["cpu_s"], row["cpu_capability"]))
    if a.json:
        import torch

        with open(a.json, "w") as f:
            json.dump({"torch": torch.__version__, "load_avg": os.getloadavg(), "runs": rows}, f, indent=2)


if __name__ == "__main__":
    main()
