# ../2026-12-05-build-follow/ab_lat.py at half resolution: its features from the photo resized as the loss does at
# scale 0.5 (nearest, sigma_xy 80 * 0.5). VAR, OFF, R as there.
import os, runpy
import torch.nn.functional as F
import segops.bench.crf as crf
import segops.ops.lattice as lattice

photo, features = crf.photo, lattice.crf_features
crf.photo = lambda name, size: F.interpolate(photo(name, size), scale_factor=0.5, mode="nearest")
lattice.crf_features = lambda images, sigma_rgb, sigma_xy: features(images, sigma_rgb, sigma_xy * 0.5)
runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "2026-12-05-build-follow", "ab_lat.py"))
