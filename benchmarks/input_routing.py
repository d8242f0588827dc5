"""What routing checked files past the format dispatch buys: jewelclf's decoding pass
(``decoded_dataset`` + ``batched``) with the records as the data check returns them (JPEGs
go through ``load_jpeg``, other formats through ``load_other``) against the same records with
their format cleared (every file through ``load_image`` and its per-image format ``tf.cond``),
over all the files and over the JPEGs alone, interleaved in one process.

Usage::

    python benchmarks/input_routing.py ../shared/data/jewellery/training --size 224 --repeats 7
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from jewelclf.config import DataConfig  # noqa: E402
from jewelclf.data.pipeline import batched, decoded_dataset  # noqa: E402
from jewelclf.data.sources import load_source  # noqa: E402
from jewelclf.data.validate import check_records  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="a folder of class subfolders")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    source = load_source(args.folder)
    checked = [c.record for c in check_records(source.records, 50_000_000, 8) if c.ok]
    jpegs = [r for r in checked if r.format == "JPEG"]
    unknown = [dataclasses.replace(r, format=None) for r in checked]
    unknown_jpegs = [dataclasses.replace(r, format=None) for r in jpegs]

    def decode_pass(records) -> int:
        n = 0
        ds = batched(decoded_dataset(source, records, DataConfig(), args.size),
                     len(source.class_names), args.batch_size)
        for x, _ in ds:
            n += int(x.shape[0])
        return n

    rows = {"all files, routed": checked, "all files, format tf.cond": unknown,
            "JPEGs, routed": jpegs, "JPEGs, format tf.cond": unknown_jpegs}
    wall: dict[str, list[float]] = {k: [] for k in rows}
    cpu: dict[str, list[float]] = {k: [] for k in rows}
    for _ in range(args.repeats):
        for name, records in rows.items():
            c0, t0 = time.process_time(), time.perf_counter()
            n = decode_pass(records)
            wall[name].append(n / (time.perf_counter() - t0))
            cpu[name].append(n / (time.process_time() - c0))
    print(f"{len(checked)} images ({len(jpegs)} JPEG), {args.size} px, batch {args.batch_size}, "
          f"median of {args.repeats} interleaved passes")
    print(f"{'decoding pass':<28} {'img/s':>8} {'img/CPU-s':>10}")
    for name in rows:
        print(f"{name:<28} {statistics.median(wall[name]):8.1f} {statistics.median(cpu[name]):10.1f}")
    for group in ("all files", "JPEGs"):
        r = f"{group}, routed"
        t = f"{group}, format tf.cond"
        print(f"{group}: routed x{statistics.median(wall[r]) / statistics.median(wall[t]):.2f} wall, "
              f"x{statistics.median(cpu[r]) / statistics.median(cpu[t]):.2f} per CPU-second")


if __name__ == "__main__":
    main()
