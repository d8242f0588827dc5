"""Peak memory of ``jewelclf fit`` against the number of images: does it stream or load?

Generates JPEG photos (5 classes, ``--size`` px, textured so they do not compress to nothing)
and runs ``jewelclf fit`` on a small and a large subset of them, each in its own process, one
after the other. Prints each run's peak RSS (``wait4``'s ``ru_maxrss`` of that process alone), its
wall time and the ratio large/small. A pipeline that loaded the data set into memory would grow
with the images: 20,000 decoded 224 px images are 2.8 GiB of uint8 pixels.

Usage (about 25 minutes on 2 CPU cores; MobileNet 0.25 keeps the network's own share small)::

    python benchmarks/memory.py --images 20000 --compare 2000 --size 224 \\
        --backbone mobilenet_025 --weights ../shared/weights/mobilenet_0.25_224_imagenet_notop.h5
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CLASSES = ("bracelet", "earrings", "necklace", "rings", "watch")


def generate(root: Path, n: int, size: int, seed: int = 0) -> None:
    """``n`` JPEGs spread over the classes: a class-dependent pattern plus noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for c in CLASSES:
        (root / c).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        c = i % len(CLASSES)
        freq = 2 + 3 * c
        base = 127 + 100 * np.sin(2 * np.pi * (freq * xx + rng.uniform() * yy))
        img = np.stack([base, np.roll(base, c * 7, axis=0), base.T], axis=-1)
        img += rng.normal(0, 25, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
            root / CLASSES[c] / f"img_{i:06d}.jpg", quality=90)


def subset(src: Path, dst: Path, n: int) -> None:
    """The first ``n`` generated files (hard links), keeping the class balance."""
    files = sorted(src.rglob("*.jpg"), key=lambda p: p.name)[:n]
    for f in files:
        (dst / f.parent.name).mkdir(parents=True, exist_ok=True)
        os.link(f, dst / f.parent.name / f.name)


def run_fit(data: Path, run_dir: Path, args) -> dict:
    cmd = [sys.executable, "-m", "jewelclf.cli", "fit", str(data), "--run-dir", str(run_dir),
           "--backbone", args.backbone, "--weights", args.weights, "--image-size", str(args.size),
           "--epochs", str(args.epochs), "--fine-tune-epochs", str(args.fine_tune_epochs),
           "--overwrite"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"fit failed ({proc.returncode}):\n{out[-3000:]}")
    return {"wall_s": wall, "output": out}


def peak_rss_of(cmd_runner, *a) -> tuple[dict, float]:
    """Run in a forked child so that its RUSAGE_CHILDREN peak is this fit's alone."""
    import json
    import resource

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: runs fit as its own grandchild and reports
        os.close(r)
        result = cmd_runner(*a)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        os.write(w, json.dumps({**result, "peak_rss_mib": peak}).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    os.waitpid(pid, 0)
    out = json.loads(data)
    return out, out["peak_rss_mib"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=20_000)
    p.add_argument("--compare", type=int, default=2_000, help="The smaller run's image count.")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--backbone", default="mobilenet_025")
    p.add_argument("--weights", default="none")
    p.add_argument("--epochs", type=int, default=2, help="Stage-1 epochs.")
    p.add_argument("--fine-tune-epochs", type=int, default=1)
    p.add_argument("--work", help="Folder for the images and runs (default: a temp folder, removed).")
    args = p.parse_args()

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="jewelclf-memory-"))
    try:
        full = work / "all"
        if not full.is_dir() or sum(1 for _ in full.rglob("*.jpg")) < args.images:
            shutil.rmtree(full, ignore_errors=True)
            t = time.perf_counter()
            generate(full, args.images, args.size)
            print(f"generated {args.images} JPEGs of {args.size} px in {time.perf_counter() - t:.0f} s",
                  flush=True)
        rows = []
        for n in (args.compare, args.images):
            data = work / f"data_{n}"
            if not data.is_dir():
                subset(full, data, n)
            result, peak = peak_rss_of(run_fit, data, work / f"run_{n}", args)
            rows.append((n, peak, result["wall_s"]))
            print(f"fit on {n:>6} images: peak RSS {peak:7.0f} MiB, wall {result['wall_s']:6.0f} s",
                  flush=True)
        (n0, m0, _), (n1, m1, _) = rows
        print(f"backbone {args.backbone} at {args.size} px, {args.epochs} stage-1 + "
              f"{args.fine_tune_epochs} stage-2 epochs; {os.cpu_count()} CPU cores")
        print(f"peak RSS x{m1 / m0:.2f} for x{n1 / n0:.0f} the images; "
              f"decoded pixels of {n1} images would be {n1 * args.size * args.size * 3 / 2**30:.1f} GiB")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
