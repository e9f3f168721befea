"""Phase 2 on cached activations against phase 2 on images, as the number of images grows.

    python -m benchmarks.phase2 --image_dir=../shared/data/flowers_1500 \
        --backbone_file=../shared/models/efficientnet_lite0_imagenet_notop.keras --sizes=2000,8000,32000

For each size N, N distinct photos are made from --image_dir (each a different crop of one of its photos, long side
--photo_side: real content, no two files alike, so the converter skips none as duplicates), converted once with
`python -m tfrecords.build` (default splits), then trained twice by `python -m trainer.train` with our defaults
except --epochs=1 --fine_tune_epochs=--epochs2 --fine_tune_patience=0 --nodata_quality (the report is another
stage's cost), once with --phase2_cache=always and once with never. From each run's metrics.json: phase 1's pass
(which computes the cut activations too when cached; with its LiteRT conversion, and which engine ran it),
phase 2's seconds per epoch (training and validation) and
training images/s, the cache's size and whether it was spilled, and the run's total. "x faster" = phase 2's epoch
time on images / on cached activations, from the same N in the same benchmark run.
The machine's time varies (FINDINGS.md): the two modes of a size run back to back, in alternating order per size.
"""

import json
import os
import random
import subprocess
import sys
import time

from absl import app, flags
from PIL import Image

from benchmarks import common

FLAGS = flags.FLAGS
flags.DEFINE_string("image_dir", os.path.join(os.path.dirname(common.REPO_ROOT), "shared", "data", "flowers_1500"),
                    "A class-folder image tree to make the photos from.")
flags.DEFINE_string("backbone_file", os.path.join(os.path.dirname(common.REPO_ROOT), "shared", "models",
                                                  "efficientnet_lite0_imagenet_notop.keras"), "--backbone of the runs.")
flags.DEFINE_string("sizes", "2000,8000", "Numbers of images, comma-separated.")
flags.DEFINE_integer("image_size", 128, "--image_size of the runs.")
flags.DEFINE_integer("photo_side", 200, "Long side of the made photos, in pixels.")
flags.DEFINE_integer("epochs2", 2, "Phase-2 epochs per run.")
flags.DEFINE_string("work_dir", "/tmp/phase2_benchmark", "Made photos, shards and runs (kept for reruns).")


def make_photos(image_dir: str, output_dir: str, *, count: int, side: int) -> str:
    """Writes (once) `count` photos spread over image_dir's classes: photo k is a crop of source k % n at a place and
    scale chosen by k (seeded), resized to long side `side`."""
    if os.path.exists(os.path.join(output_dir, ".complete")):
        return output_dir
    classes = sorted(name for name in os.listdir(image_dir) if os.path.isdir(os.path.join(image_dir, name)))
    sources = [(name, os.path.join(image_dir, name, file)) for name in classes
               for file in sorted(os.listdir(os.path.join(image_dir, name)))
               if file.lower().endswith(common.IMAGE_EXTENSIONS)]
    shuffler = random.Random(0)
    for index in range(count):
        class_name, path = sources[index % len(sources)]
        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = shuffler.uniform(0.6, 0.95)
            width, height = int(image.width * scale), int(image.height * scale)
            left, top = shuffler.randint(0, image.width - width), shuffler.randint(0, image.height - height)
            photo = image.crop((left, top, left + width, top + height))
            photo.thumbnail((side, side), Image.BILINEAR)
            os.makedirs(os.path.join(output_dir, class_name), exist_ok=True)
            photo.save(os.path.join(output_dir, class_name, f"photo_{index:06d}.jpg"), quality=90)
    open(os.path.join(output_dir, ".complete"), "w").close()
    return output_dir


def convert(image_dir: str, output_dir: str) -> dict:
    if not os.path.exists(os.path.join(output_dir, "manifest.json")):
        subprocess.run([sys.executable, "-m", "tfrecords.build", f"--input_dir={image_dir}",
                        f"--output_dir={output_dir}", "--overwrite"], cwd=common.REPO_ROOT, check=True,
                       capture_output=True)
    with open(os.path.join(output_dir, "manifest.json")) as file:
        return json.load(file)


def train(data_dir: str, model_dir: str, mode: str) -> dict:
    """One run; returns the numbers of its metrics.json this benchmark prints."""
    command = [
        sys.executable, "-m", "trainer.train", f"--data_dir={data_dir}", f"--model_dir={model_dir}",
        f"--backbone={FLAGS.backbone_file}", "--preprocess=tf", f"--image_size={FLAGS.image_size}", "--epochs=1",
        f"--fine_tune_epochs={FLAGS.epochs2}", "--fine_tune_patience=0", "--nodata_quality",
        f"--phase2_cache={mode}",
    ]
    started = time.perf_counter()
    with open(model_dir + ".log", "w") as log:
        subprocess.run(command, cwd=common.REPO_ROOT, check=True, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    with open(os.path.join(model_dir, "metrics.json")) as file:
        metrics = json.load(file)
    table = metrics["time_seconds"]
    phase2 = [entry for entry in metrics["history"] if entry["phase"] == "phase2"]
    cache = metrics.get("phase2_cache", {})
    return {
        # With LiteRT (--frozen_pass_engine=auto picks it past its threshold) the pass includes its conversion.
        "phase1 pass s": table.get("phase1: caching backbone features", 0.0)
        + table.get("phase1: LiteRT conversion of the frozen pass", 0.0),
        "engine": metrics.get("frozen_pass", {}).get("engine", "-"),
        "phase2 s/epoch": table.get("phase2: training and validation", 0.0) / max(len(phase2), 1),
        "phase2 img/s": sum(entry["images_per_second"] for entry in phase2) / max(len(phase2), 1),
        "cache MiB": cache.get("cache_mib", 0.0),
        "spilled": cache.get("spilled", False),
        "run s": wall,
        "test accuracy": metrics["accuracy"],
    }


def main(argv):
    del argv
    sizes = [int(size) for size in FLAGS.sizes.split(",")]
    print(f"{'images':>7} {'train':>6} {'mode':>7} {'phase1 pass s':>14} {'phase2 s/epoch':>15} {'phase2 img/s':>13} "
          f"{'cache MiB':>10} {'spilled':>8} {'run s':>7} {'x faster':>9} {'pass engine':>12}", flush=True)
    for position, size in enumerate(sizes):
        photos = make_photos(FLAGS.image_dir, os.path.join(FLAGS.work_dir, f"photos_{size}"), count=size,
                             side=FLAGS.photo_side)
        data_dir = os.path.join(FLAGS.work_dir, f"tfrecords_{size}")
        manifest = convert(photos, data_dir)
        modes = ("always", "never") if position % 2 == 0 else ("never", "always")
        results = {}
        for mode in modes:
            model_dir = os.path.join(FLAGS.work_dir, f"run_{size}_{mode}")
            subprocess.run(["rm", "-rf", model_dir], check=True)
            results[mode] = train(data_dir, model_dir, mode)
        speedup = results["never"]["phase2 s/epoch"] / max(results["always"]["phase2 s/epoch"], 1e-9)
        for mode in ("never", "always"):
            row = results[mode]
            print(f"{size:>7} {manifest['splits']['train']['num_examples']:>6} {mode:>7} {row['phase1 pass s']:>14.1f} "
                  f"{row['phase2 s/epoch']:>15.1f} {row['phase2 img/s']:>13.0f} {row['cache MiB']:>10.0f} "
                  f"{str(row['spilled']):>8} {row['run s']:>7.0f} {speedup if mode == 'always' else 1.0:>9.2f} "
                  f"{row['engine']:>12}",
                  flush=True)


if __name__ == "__main__":
    app.run(main)
