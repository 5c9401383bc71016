"""``segops demo``: the lecture's weak-supervision table in miniature, on the built-in synthetic data.

``segops demo`` (``make demo``) trains the same small model five ways on the same images — full masks with
cross-entropy, and scribbles with partial cross-entropy (pCE), pCE + dense CRF loss, pCE + entropy and
pCE + CRF + entropy — and prints the validation mIoU of each in the layout of the lecture's table (Tang et al.,
ECCV'18: Full | PCE | PCE+CRF | PCE+ENTROPY | PCE+CRF+ENTROPY) with the share of the pCE -> full-supervision gap
each closes. ``--settings`` runs any subset, including clicks instead of scribbles (``clicks:pce``,
``clicks:pce+crf``, ...: one click per object region), which get their own row.

``segops demo --experiment tags`` runs the image-level-tags experiment instead (see :mod:`segops.weak.tags`):
full supervision, the class activation maps' own segmentation (``cam``), and networks trained on the CAM seeds
with pCE (``tags:pce``) and with pCE + dense CRF (``tags:pce+crf``), both with SEC's expand loss on the tags,
and the same two without it (``tags:pce:no-expand``, ``tags:pce+crf:no-expand``).

Outputs (``runs/demo/`` or ``runs/demo-tags/``): ``results.json`` (mIoU in 0..1 per setting, ``gap_closed``,
times, settings), ``comparison.png`` (labelled columns: image | weak labels | each setting | truth, with a class
legend) and each setting's own run folder (log.csv, checkpoint, panels).

The settings train in ``--jobs`` parallel processes of ``--threads`` torch threads each; every number depends
only on the seed (the data, the initialisation, the sample order), not on the number of processes, so a run
reproduces its table exactly on the same machine.

Regularizer weights: chosen once on an independent replicate of the experiment (training seed 100, validation
seed 101; ``benchmarks/demo_weights.py``), never on a reported split; :data:`DEMO_CRF` and :data:`DEMO_ENTROPY`
hold the chosen values.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    "DEMO_MODEL",
    "DEMO_CRF",
    "DEMO_ENTROPY",
    "SETTINGS",
    "DEFAULT_SETTINGS",
    "LOSS_COLUMNS",
    "run_demo",
    "run_settings",
    "add_arguments",
    "main",
    "write_results",
    "demo_config",
]

# ---- the demo's model and regularizer settings ---------------------------------------------------------------
#: the demo model: the segops U-Net at 1/8 width, with BatchNorm and without dropout (the 2015 paper's U-Net
#: has dropout 0.5 and no BatchNorm: at this size and budget that variant closed 36% of the pCE -> full gap with
#: the CRF loss, vs 85% for this one).
DEMO_MODEL = {"model": "unet", "model_width": 0.125, "model_args": {"batch_norm": True, "dropout": 0.0}}
#: the dense CRF loss settings for 64x64 synthetic images: a spatially local kernel (sigma_xy 10 px instead of
#: ECCV'18's 80, which is larger than these images) and a larger weight than ECCV'18's 2e-9 (tiny images, few
#: pixels); the weight was chosen on the selection replicate (see the module docstring).
DEMO_CRF = {"crf_weight": 2e-4, "crf_sigma_rgb": 15.0, "crf_sigma_xy": 10.0, "crf_scale": 0.5}
#: the weight of the mean pointwise entropy, chosen on the selection replicate among 0.03, 0.1, 0.3 and 1 (1 won:
#: 46.9% mIoU there against 38.0-38.8% for the others). pCE + CRF + entropy uses the two weights chosen separately.
DEMO_ENTROPY = {"entropy_weight": 1.0}

#: the loss columns of the lecture's table, in its order: (loss, column title).
LOSS_COLUMNS: Tuple[Tuple[str, str], ...] = (
    ("pce", "pCE"),
    ("pce+crf", "pCE+CRF"),
    ("pce+entropy", "pCE+entropy"),
    ("pce+crf+entropy", "pCE+CRF+entropy"),
)
#: the rows of weakly-supervised settings: (key prefix, supervision, row title).
_WEAK_ROWS = (("", "scribble", "scribbles"), ("clicks:", "clicks", "clicks"))

#: every setting ``--settings`` knows: (key, supervision, loss, label), in the order the table lists them.
SETTINGS: Tuple[Tuple[str, str, str, str], ...] = (("full", "full", "ce", "full masks, CE"),) + tuple(
    (prefix + loss, sup, loss, "%s, %s" % (row, title)) for prefix, sup, row in _WEAK_ROWS for loss, title in LOSS_COLUMNS
)
#: what ``segops demo`` runs by default: the lecture's five columns on scribbles.
DEFAULT_SETTINGS: Tuple[str, ...] = ("full", "pce", "pce+crf", "pce+entropy", "pce+crf+entropy")
_BY_KEY = {k: (s, loss, label) for k, s, loss, label in SETTINGS}


def _cost(key: str) -> float:
    loss = _BY_KEY[key][1]
    return 1.0 + 0.1 * ("crf" in loss) + 0.05 * ("entropy" in loss)


def check_settings(keys: Sequence[str]) -> List[str]:
    """The requested setting keys, validated and de-duplicated (``ValueError`` naming the unknown ones)."""
    out: List[str] = []
    bad = [k for k in keys if k not in _BY_KEY]
    if bad:
        raise ValueError("unknown demo setting(s) %s; known: %s" % (", ".join(map(repr, bad)), ", ".join(_BY_KEY)))
    for k in keys:
        if k not in out:
            out.append(k)
    if not out:
        raise ValueError("--settings: no setting given")
    return out


def demo_config(
    key: str,
    out_dir: str,
    seed: int,
    epochs: int,
    train_images: int,
    val_images: int,
    threads_note: str = "",
    crf: Optional[Dict[str, float]] = None,
    entropy: Optional[Dict[str, float]] = None,
):
    """The :class:`segops.train.TrainConfig` of one demo setting (``crf`` / ``entropy`` override
    :data:`DEMO_CRF` / :data:`DEMO_ENTROPY`)."""
    from segops.train import TrainConfig

    sup, loss, _ = _BY_KEY[key]
    return TrainConfig(
        data="synthetic",
        synthetic_train=train_images,
        synthetic_val=val_images,
        image_size=64,
        synthetic_seed=seed,
        supervision=sup,
        loss=loss,
        optimizer="adam",
        lr=3e-3,
        weight_decay=0.0,
        epochs=epochs,
        batch_size=8,
        seed=seed,
        # no loader processes: the synthetic samples stay cached in the training process (a loader worker would
        # render them again every epoch); the batches, hence the numbers, are the same either way
        workers=0,
        out_dir=os.path.join(out_dir, key.replace("+", "_").replace(":", "_")),
        overwrite=True,  # a rerun of the demo replaces its previous runs
        eval_every=epochs,
        panels=4,
        progress=True,
        **DEMO_MODEL,
        **dict(DEMO_CRF, **(crf or {})),
        **dict(DEMO_ENTROPY, **(entropy or {})),
    )


# ---- running settings (in this process or in worker processes) -------------------------------------------------


def _train_one(key: str, cfg, threads: Optional[int], model_fn, crf_cls, log, quiet: bool) -> Dict[str, object]:
    from segops.train import train

    if threads is not None:
        torch.set_num_threads(int(threads))
    if quiet:
        cfg.progress = False
    cpu0, t0 = time.process_time(), time.perf_counter()
    summary = train(cfg, model_fn=model_fn, crf_cls=crf_cls, log=(lambda s: None) if quiet else log)
    val = summary["val"]
    return {
        "key": key,
        "miou": float(val["miou"]),  # type: ignore[index]
        "iou": list(val["iou"]),  # type: ignore[index]
        "time_s": time.perf_counter() - t0,
        "cpu_s": time.process_time() - cpu0,
        "checkpoint": summary["checkpoint"],
        "model": summary["model"] if not quiet else None,
    }


def _worker(args) -> Dict[str, object]:
    key, cfg, threads, model_fn, crf_cls = args
    return _train_one(key, cfg, threads, model_fn, crf_cls, print, quiet=True)


def run_settings(
    jobs: Sequence[Tuple[str, object]],
    processes: int = 1,
    threads: Optional[int] = 1,
    model_fn: Optional[Callable] = None,
    crf_cls=None,
    log: Callable[[str], None] = print,
) -> Dict[str, Dict[str, object]]:
    """Trains ``(key, TrainConfig)`` pairs, in this process (``processes=1``) or in that many worker processes
    (spawned, ``threads`` torch threads each; ``model_fn`` / ``crf_cls`` must then be picklable, i.e. defined
    at module level). Returns ``{key: {"miou", "iou", "time_s", "cpu_s", "checkpoint", "model"}}``; "model"
    is the trained module in-process and None from workers (load the checkpoint)."""
    out: Dict[str, Dict[str, object]] = {}
    if processes <= 1 or len(jobs) <= 1:
        for key, cfg in jobs:
            log("== %s (%s, loss %s)" % (key, cfg.supervision, cfg.loss))  # type: ignore[attr-defined]
            out[key] = _train_one(key, cfg, threads, model_fn, crf_cls, log, quiet=False)
        return out
    import multiprocessing as mp

    order = sorted(jobs, key=lambda kc: -_cost(kc[0]) if kc[0] in _BY_KEY else 0.0)  # longest first
    log("training %s in %d processes of %s torch thread(s) each" % (", ".join(k for k, _ in order), processes, threads))
    with ProcessPoolExecutor(max_workers=processes, mp_context=mp.get_context("spawn")) as ex:
        futures = {key: ex.submit(_worker, (key, cfg, threads, model_fn, crf_cls)) for key, cfg in order}
        for key, _ in order:
            out[key] = futures[key].result()
            log("   %-22s mIoU %.2f%%  (%.1f s, CPU %.1f s)" % (key, 100 * float(out[key]["miou"]), out[key]["time_s"], out[key]["cpu_s"]))  # type: ignore[arg-type]
    return {k: out[k] for k, _ in jobs}


def _load_model(res: Dict[str, object], model_fn: Optional[Callable]) -> torch.nn.Module:
    if res.get("model") is not None:
        return res["model"]  # type: ignore[return-value]
    from segops.train import _model_from_checkpoint, load_checkpoint

    ck = load_checkpoint(str(res["checkpoint"]))
    model, _ = _model_from_checkpoint(ck, torch.device("cpu"), model_fn)
    return model


@torch.no_grad()
def _predict(model: torch.nn.Module, image: torch.Tensor) -> np.ndarray:
    from segops.train import normalize

    model.eval()
    logits = model(normalize(image[None]))
    if logits.shape[-2:] != image.shape[-2:]:  # strided models: upsample as in training
        logits = torch.nn.functional.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
    return logits.argmax(1)[0].numpy()


def _comparison_png(path: str, val_ds, columns: Sequence[Tuple[str, Callable[[int], np.ndarray]]], class_names, n: int = 6) -> None:
    """Writes the labelled comparison: one row per validation image, one column per (title, cell(i))."""
    from segops.figures import save_labelled_panels

    rows = [[cell(i) for _, cell in columns] for i in range(min(n, len(val_ds)))]
    save_labelled_panels(path, rows, [t for t, _ in columns], class_names, scale=3)


def _image_cell(ds, i: int) -> np.ndarray:
    return ds[i]["image"].permute(1, 2, 0).clamp(0, 255).round().to(torch.uint8).numpy()


# ---- the table -----------------------------------------------------------------------------------------------


def _net_name(model_fn) -> str:
    if model_fn is not None:
        return "custom model"
    args = "".join(", %s=%s" % kv for kv in DEMO_MODEL.get("model_args", {}).items())  # type: ignore[union-attr]
    return "%s (width %g%s)" % (DEMO_MODEL["model"], DEMO_MODEL["model_width"], args)


def gap_closed(results: Dict[str, float], key: str) -> Optional[float]:
    """Share of the pCE -> full gap that setting ``key`` closes: ``(key - pce) / (full - pce)`` with the
    pCE of the same kind of weak labels (``clicks:pce`` for ``clicks:*``); None when a term is missing."""
    prefix = key.split(":")[0] + ":" if ":" in key else ""
    full, base, v = results.get("full"), results.get(prefix + "pce"), results.get(key)
    if full is None or base is None or v is None or full - base <= 0:
        return None
    return (v - base) / (full - base)


def format_table(results: Dict[str, float], times: Dict[str, float], net: str, seed: int, val_images: int) -> List[str]:
    """The lecture's layout: network / weak labels | full | pCE | pCE+CRF | pCE+entropy | pCE+CRF+entropy,
    a "gap closed" line under each row of weak labels, and the training times."""
    cols = [("full", "full")] + list(LOSS_COLUMNS)
    head = ["network", "weak labels"] + [t for _, t in cols]
    body: List[List[str]] = []
    for prefix, _, row in _WEAK_ROWS:
        keys = ["full"] + [prefix + loss for loss, _ in LOSS_COLUMNS]
        if not any(k in results for k in keys[1:]):
            continue
        body.append([net, row] + ["%.2f" % (100 * results[k]) if k in results else "-" for k in keys])
        gaps = [gap_closed(results, k) for k in keys[1:]]
        body.append(["", "  gap closed", ""] + ["%.0f%%" % (100 * g) if g is not None else "-" for g in gaps])
    if "full" in results and len(body) == 0:
        body.append([net, "-", "%.2f" % (100 * results["full"])] + ["-"] * len(LOSS_COLUMNS))
    tk = ["full"] + [p + loss for p, _, _ in _WEAK_ROWS for loss, _ in LOSS_COLUMNS]
    tline = ", ".join("%s %.0f" % (k, times[k]) for k in tk if k in times)
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    fmt = lambda r: " | ".join(s.ljust(widths[i]) if i < 2 else s.rjust(widths[i]) for i, s in enumerate(r))  # noqa: E731
    lines = [
        "",
        "mIoU (%%) on %d held-out synthetic images, seed %d (lecture / ECCV'18, DeepLab-LargeFOV on VOC: "
        "63.0 | 55.8 | 62.2 | 59.9 | 63.0)" % (val_images, seed),
        fmt(head),
        "-+-".join("-" * w for w in widths),
    ] + [fmt(r) for r in body]
    lines.append("gap closed = (setting - pCE) / (full - pCE); train time (s): %s" % tline)
    return lines


def run_demo(
    out_dir: str = "runs/demo",
    seed: int = 0,
    epochs: int = 16,
    train_images: int = 400,
    val_images: int = 200,
    threads: Optional[int] = 1,
    model_fn: Optional[Callable] = None,
    crf_cls=None,
    log: Callable[[str], None] = print,
    settings: Optional[Sequence[str]] = None,
    jobs: int = 1,
    crf: Optional[Dict[str, float]] = None,
    entropy: Optional[Dict[str, float]] = None,
) -> Dict[str, object]:
    """Trains the settings (default :data:`DEFAULT_SETTINGS`) and writes ``results.json`` and
    ``comparison.png`` into ``out_dir``; returns the results dict. ``jobs`` > 1 trains in that many processes."""
    from segops.data import SyntheticScribbles
    from segops.train import colorize
    from segops.weak.supervision import ClickLabels

    keys = check_settings(settings if settings is not None else DEFAULT_SETTINGS)
    if threads is not None:
        torch.set_num_threads(int(threads))
    os.makedirs(out_dir, exist_ok=True)
    cfgs = [(k, demo_config(k, out_dir, seed, epochs, train_images, val_images, crf=crf, entropy=entropy)) for k in keys]
    t_all = time.perf_counter()
    res = run_settings(cfgs, jobs, threads, model_fn, crf_cls, log)
    total = time.perf_counter() - t_all
    results = {k: float(res[k]["miou"]) for k in keys}  # type: ignore[arg-type]
    times = {k: float(res[k]["time_s"]) for k in keys}  # type: ignore[arg-type]
    cpu = {k: float(res[k]["cpu_s"]) for k in keys}  # type: ignore[arg-type]
    net = _net_name(model_fn)
    for ln in format_table(results, times, net, seed, val_images):
        log(ln)
    log("total %.1f s (CPU %.1f s in the training processes); %d train / %d val images of 64x64, %d epochs x %d steps "
        "of 8, %d process(es) x %s torch thread(s)" % (total, sum(cpu.values()), train_images, val_images, epochs,
                                                       train_images // 8, max(1, min(jobs, len(keys))), threads))
    # the figure: validation images | scribbles (| clicks) | each setting | truth
    val_ds = SyntheticScribbles(val_images, size=64, seed=seed + 1)
    models = {k: _load_model(res[k], model_fn) for k in keys}
    columns: List[Tuple[str, Callable[[int], np.ndarray]]] = [("image", lambda i: _image_cell(val_ds, i))]
    if any(_BY_KEY[k][0] == "scribble" for k in keys):
        columns.append(("scribbles", lambda i: colorize(val_ds[i]["scribble"].numpy())))
    if any(_BY_KEY[k][0] == "clicks" for k in keys):
        clicks = ClickLabels(val_ds, seed)
        columns.append(("clicks", lambda i: colorize(clicks[i]["scribble"].numpy())))
    for k in keys:
        columns.append((k.replace("pce", "pCE").replace("crf", "CRF"), lambda i, m=models[k]: colorize(_predict(m, val_ds[i]["image"]))))
    columns.append(("truth", lambda i: colorize(val_ds[i]["mask"].numpy())))
    png = os.path.join(out_dir, "comparison.png")
    _comparison_png(png, val_ds, columns, val_ds.classes)
    out: Dict[str, object] = dict(results)
    out.update(
        gap_closed=gap_closed(results, "pce+crf") if "pce+crf" in results else None,
        gap_closed_by={k: gap_closed(results, k) for k in keys if k != "full" and not k.endswith(":pce") and k != "pce"},
        iou={k: res[k]["iou"] for k in keys},
        settings=keys,
        model=DEMO_MODEL if model_fn is None else {"model": "custom model_fn", "repr": repr(model_fn)},
        crf=dict(DEMO_CRF, **(crf or {})),
        entropy=dict(DEMO_ENTROPY, **(entropy or {})),
        crf_loss="segops.nn.DenseCRFLoss" if crf_cls is None else "%s.%s" % (crf_cls.__module__, crf_cls.__name__),
    )
    return write_results(out_dir, out, dict(times_s=times, cpu_s=cpu, total_time_s=total, seed=seed, epochs=epochs,
                                            train_images=train_images, val_images=val_images,
                                            jobs=max(1, min(jobs, len(keys))), threads=threads, comparison_png=png), log)


def write_results(out_dir: str, results: Dict[str, object], run: Dict[str, object], log: Callable[[str], None]) -> Dict[str, object]:
    """Writes ``results`` plus the facts of the run (times, sizes, seed, threads, torch version, figure) to
    ``out_dir/results.json``; returns the merged dict."""
    out = dict(results)
    threads = run.pop("threads")
    out.update(run)
    out.update(torch_threads=threads if threads is not None else torch.get_num_threads(), torch_version=torch.__version__)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(out, f, indent=2)
    log("wrote %s and %s" % (os.path.join(out_dir, "results.json"), out.get("comparison_png")))
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", choices=("table", "tags"), default="table",
                   help="table: the lecture's five columns (and clicks); tags: image-level tags through CAM "
                        "(default %(default)s)")
    p.add_argument("--out-dir", default=None, help="output folder (default runs/demo, or runs/demo-tags)")
    p.add_argument("--settings", default=None, metavar="KEY,KEY",
                   help="comma-separated subset of: %s (default: %s)" % (", ".join(k for k, *_ in SETTINGS), ",".join(DEFAULT_SETTINGS)))
    p.add_argument("--seed", type=int, default=0, help="data and model seed (default %(default)s)")
    p.add_argument("--epochs", type=int, default=16,
                   help="epochs per setting (default %(default)s; --experiment tags: the networks trained on the CAM "
                        "seeds train 1.5 times as many)")
    p.add_argument("--train-images", type=int, default=400, help="synthetic training images (default %(default)s)")
    p.add_argument("--val-images", type=int, default=200, help="synthetic validation images (default %(default)s)")
    p.add_argument("--jobs", type=int, default=None,
                   help="settings trained in parallel processes (default: the number of CPU cores, at most the "
                        "number of settings)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (default %(default)s: on a 2-core machine two one-thread "
                        "processes are several times faster than one two-thread process)")


def main(args: argparse.Namespace) -> int:
    import sys

    jobs = args.jobs if args.jobs is not None else max(1, os.cpu_count() or 1)
    try:
        if args.experiment == "tags":
            from segops.weak.tags_demo import run_tags_demo

            if args.settings is not None:
                raise ValueError("--settings is for the table experiment; --experiment tags always runs its six settings")
            run_tags_demo(args.out_dir or "runs/demo-tags", args.seed, args.epochs, args.train_images, args.val_images,
                          args.threads, jobs=jobs)
            return 0
        settings = None if args.settings is None else [s.strip() for s in args.settings.split(",") if s.strip()]
        if settings is not None:
            check_settings(settings)
        run_demo(args.out_dir or "runs/demo", args.seed, args.epochs, args.train_images, args.val_images, args.threads,
                 settings=settings, jobs=jobs)
    except ValueError as e:
        print("segops demo: error: %s" % e, file=sys.stderr)
        return 2
    return 0
