"""Peak memory of ``jewelclf fit`` against the number of images: does it stream or load? And,
with ``--serve``, of an exported SavedModel answering a hostile image.

Generates JPEG photos (5 classes, ``--size`` px, textured so they do not compress to nothing)
and runs ``jewelclf fit`` on a small and a large subset of them, each in its own process, one
after the other. Prints each run's peak RSS (``wait4``'s ``ru_maxrss`` of that process alone), its
wall time and the ratio large/small. A pipeline that loaded the data set into memory would grow
with the images: 20,000 decoded 224 px images are 2.8 GiB of uint8 pixels.

Usage (about 25 minutes on 2 CPU cores; MobileNet 0.25 keeps the network's own share small)::

    python benchmarks/memory.py --images 20000 --compare 2000 --size 224 \\
        --backbone mobilenet_025 --weights ../shared/weights/mobilenet_0.25_224_imagenet_notop.h5

``--serve EXPORT`` instead loads a SavedModel (a version folder) in a fresh process that imports
TensorFlow alone, as TF Serving would, and sends ``serving_default`` one image: (a) a normal
photo (``--photo``), (b) an 875 KB all-zero RGBA PNG of 15000x15000 (900 MB decoded), (c) a
JPEG of a few hundred bytes whose header claims 60000x60000. Prints each process's peak RSS,
the answer and the time; (b) and (c) must stay within a small factor of (a)::

    python benchmarks/memory.py --serve exported_models/RUN/1 \\
        --photo ../shared/data/jewellery/test/RINGS/<a photo>.jpg
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
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


SERVE_CHILD = r'''
import json, os, resource, sys, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf

fn = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
data = open(sys.argv[2], "rb").read()
t = time.perf_counter()
out = fn(images=tf.constant([data]))
first = time.perf_counter() - t
t = time.perf_counter()
fn(images=tf.constant([data]))
print(json.dumps({"loaded_mib": loaded, "seconds": first, "again": time.perf_counter() - t, "bytes": len(data),
                  "valid": bool(out["valid"].numpy()[0]), "error": out["error"].numpy()[0].decode()}))
'''


def png_bomb(width: int = 15000, height: int = 15000, rows_per_block: int = 500) -> bytes:
    """An all-zero RGBA PNG (875 KB at 15000x15000), built without holding its pixels: after a
    full flush the deflate stream of one block of zero rows repeats, and zeros' Adler-32 is known."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    block = bytes((1 + 4 * width) * rows_per_block)
    z = zlib.compressobj(9)
    first = z.compress(block) + z.flush(zlib.Z_FULL_FLUSH)
    again = z.compress(block) + z.flush(zlib.Z_FULL_FLUSH)
    adler = ((len(block) * (height // rows_per_block)) % 65521) << 16 | 1
    idat = first + again * (height // rows_per_block - 1) + b"\x03\x00" + struct.pack(">I", adler)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def jpeg_claiming(width: int, height: int) -> bytes:
    """A tiny real JPEG whose frame header (SOF0) is patched to claim ``width`` x ``height``."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, "JPEG", quality=50)
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def serve_one(saved_model: Path, image: Path) -> dict:
    """Peak RSS (``wait4``'s, of the fresh process alone) of loading ``saved_model`` and
    answering ``image``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen([sys.executable, "-c", SERVE_CHILD, str(saved_model), str(image)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0 or not out.strip():
        raise SystemExit(f"the serving process failed on {image} (status {status})")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_mib": usage.ru_maxrss / 1024}


def serve_benchmark(saved_model: Path, photo: Path, work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    cases = [("(a) photo", photo)]
    for name, data in (("(b) bomb.png", png_bomb()), ("(c) bomb.jpg", jpeg_claiming(60000, 60000))):
        (work / name[4:]).write_bytes(data)
        cases.append((name, work / name[4:]))
    rows = []
    for name, path in cases:
        r = serve_one(saved_model, path)
        rows.append(r)
        answer = "valid" if r["valid"] else f"valid=false: {r['error']}"
        print(f"{name:<13} {r['bytes']:>9} bytes: peak RSS {r['peak_mib']:6.0f} MiB (after load "
              f"{r['loaded_mib']:6.0f}), first call {r['seconds']:5.2f} s, again {r['again']:5.2f} s; {answer}",
              flush=True)
    print(f"peak RSS x{rows[1]['peak_mib'] / rows[0]['peak_mib']:.2f} (PNG) and "
          f"x{rows[2]['peak_mib'] / rows[0]['peak_mib']:.2f} (JPEG) of the photo's; "
          f"{os.cpu_count()} CPU cores")


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
    p.add_argument("--serve", metavar="SAVEDMODEL", help="Measure serving instead: a SavedModel version folder.")
    p.add_argument("--photo", help="With --serve: the normal photo, case (a).")
    args = p.parse_args()
    if args.serve:
        if not args.photo:
            p.error("--serve needs --photo PHOTO")
        work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="jewelclf-serve-"))
        try:
            serve_benchmark(Path(args.serve), Path(args.photo), work)
        finally:
            if not args.work:
                shutil.rmtree(work, ignore_errors=True)
        return

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
