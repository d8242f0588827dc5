"""GPU training throughput: ResNet50 at 224 px as jewelclf builds it, on the Keras JAX backend,
against torchvision's ResNet50 under PyTorch AMP with channels_last, on the same GPU.

Issue 5's GPU row. Both train every weight on one synthetic batch of uint8 pixels that stays on
the device (so the input pipeline is not measured), with Adam, softmax cross-entropy over 1,000
classes, and bfloat16 compute (``mixed_bfloat16`` in Keras, ``torch.autocast(bfloat16)``):

- ``keras``: :func:`jewelclf.modeling.classifier.build_classifier` (pixels in: augmentation layers, the
  backbone's preprocessing layer, ResNet50 called with ``training=False`` so BatchNorm stays
  frozen, pooling, head with a float32 softmax), every block unfrozen with
  :func:`jewelclf.modeling.classifier.unfreeze_top_blocks` (all but the stem convolution, which no block
  of jewelclf's ResNet50 holds), compiled with XLA (the JAX backend always is);
- ``torch``: ``torchvision.models.resnet50`` in channels_last, the ImageNet normalisation on
  the GPU inside the step, BatchNorm in training mode (PyTorch's usual recipe; it does a little
  more work per step than jewelclf's frozen BatchNorm).

Each framework runs in its own subprocess, one after the other: JAX would otherwise reserve
most of the GPU's memory for itself. The figure is images per second over ``--steps`` steps
after ``--warmup`` steps (which include compilation), median of ``--repeats`` timed runs.

It imports jewelclf's model code from this checkout and needs Keras 3, JAX, PyTorch and
torchvision, but not TensorFlow (jewelclf's model code is pure Keras)::

    python benchmarks/gpu_training.py --batch-sizes 128 256
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 1000


def _timed(step, steps: int, warmup: int, repeats: int, sync) -> list[float]:
    for _ in range(warmup):
        step()
    sync()
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        seconds.append(time.perf_counter() - t0)
    return seconds


def keras_worker(batch: int, size: int, steps: int, warmup: int, repeats: int, augment: bool) -> dict:
    os.environ["KERAS_BACKEND"] = "jax"
    sys.path.insert(0, str(ROOT))
    import jax
    import keras
    import numpy as np

    from jewelclf.config import Config
    from jewelclf.modeling.backbones import get_backbone
    from jewelclf.modeling.classifier import BACKBONE, build_classifier, unfreeze_top_blocks

    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    config = Config()
    config.model.backbone, config.model.weights, config.data.image_size = "resnet50", "none", size
    config.augment.enabled = augment
    model = build_classifier(config, CLASSES)
    spec = get_backbone("resnet50")
    unfreeze_top_blocks(model, spec, len(spec.blocks(model.get_layer(BACKBONE))))
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8))
    y = jax.device_put(np.eye(CLASSES, dtype="float32")[rng.integers(0, CLASSES, batch)])
    # train_on_batch hands the loss back as a NumPy value, so each call waits for its step.
    seconds = _timed(lambda: model.train_on_batch(x, y), steps, warmup, repeats, lambda: None)
    return {"framework": "keras", "backend": keras.backend.backend(), "keras": keras.__version__,
            "jax": jax.__version__, "device": jax.devices()[0].device_kind, "batch": batch, "image_size": size,
            "augment": augment, "trainable": len(model.trainable_weights),
            "img_per_s": [batch * steps / s for s in seconds]}


def torch_worker(batch: int, size: int, steps: int, warmup: int, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F
    import torchvision

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = torchvision.models.resnet50(weights=None, num_classes=CLASSES)
    model = model.to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.Adam(model.parameters(), 1e-4)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen)
    x = x.to(device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, CLASSES, (batch,), generator=gen).to(device)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1) * 255

    def step():
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = F.cross_entropy(model((x.float() - mean) / std), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    seconds = _timed(step, steps, warmup, repeats, sync)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return {"framework": "torch", "torch": torch.__version__, "torchvision": torchvision.__version__,
            "device": name, "batch": batch, "image_size": size, "img_per_s": [batch * steps / s for s in seconds]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--frameworks", nargs="+", choices=["keras", "torch"], default=["keras", "torch"])
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per repeat")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-augment", action="store_true",
                    help="build jewelclf's model without its augmentation layers")
    ap.add_argument("--worker", choices=["keras", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per subprocess")
    args = ap.parse_args()

    if args.worker:
        batch = args.batch_sizes[0]
        if args.worker == "keras":
            out = keras_worker(batch, args.image_size, args.steps, args.warmup, args.repeats, not args.no_augment)
        else:
            out = torch_worker(batch, args.image_size, args.steps, args.warmup, args.repeats)
        print("RESULT " + json.dumps(out))
        return

    results: dict[tuple[str, int], dict] = {}
    for batch in args.batch_sizes:
        for framework in args.frameworks:
            cmd = [sys.executable, __file__, "--worker", framework, "--batch-sizes", str(batch),
                   "--image-size", str(args.image_size),
                   "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--repeats", str(args.repeats)] + (["--no-augment"] if args.no_augment else [])
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(f"{framework} batch {batch}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}")
                continue
            result = json.loads(lines[-1][len("RESULT "):])
            result["process_s"] = time.perf_counter() - t0
            results[(framework, batch)] = result
            print(json.dumps(result))
    print(f"\n{args.image_size} px, bfloat16 compute, median of {args.repeats} x {args.steps} steps")
    print(f"{'framework':<44} {'batch':>5} {'img/s (median)':>15}")
    for (framework, batch), r in results.items():
        label = (f"jewelclf ResNet50, Keras {r['keras']} on JAX {r['jax']}"
                 + ("" if r.get("augment", True) else ", no augmentation")
                 if framework == "keras" else f"torchvision ResNet50, torch {r['torch']}")
        print(f"{label:<44} {batch:>5} {statistics.median(r['img_per_s']):>15.1f}")
    for batch in args.batch_sizes:
        k, t = results.get(("keras", batch)), results.get(("torch", batch))
        if k and t:
            ratio = statistics.median(k["img_per_s"]) / statistics.median(t["img_per_s"])
            print(f"batch {batch}: jewelclf/Keras/JAX at {ratio:.2f} of PyTorch's img/s on {t['device']}")


if __name__ == "__main__":
    main()
