"""Benchmark of the converter: images/s and peak RSS, 1 vs all workers, with and without --max_side.

    python benchmarks/convert.py --source_dir=../shared/data/flowers_small --num_images=2000

Builds a temporary folder of realistic JPEGs by copying the source images under new names until it
holds --num_images files (each copy gets a few trailing bytes after the JPEG end marker, so copies are
not exact duplicates, which the converter would skip), then runs the real CLI
(`python -m tfrecords.build`) as a subprocess for each setting. Reported per run:

    wall images/s        images / wall time of the whole program (includes ~3 s of TensorFlow import)
    convert images/s     rate of the decode-and-write phase, from the converter's last progress line
    peak RSS             the largest resident set of the program or any of its workers (os.wait4)

It ends with the 1 -> N worker scaling ratio of the convert phase, and a run on 4x the images to show
that peak RSS does not grow with the folder. Not a test: numbers depend on the machine and its load.
"""

import os
from pathlib import Path
import re
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

REPO_ROOT = Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines this program's flags."""
    flags.DEFINE_string("source_dir", str(REPO_ROOT.parent / "shared" / "data" / "flowers_small"),
                        "Class folders of JPEGs to repeat.")
    flags.DEFINE_integer("num_images", 2000, "Images in the benchmark folder (the RSS check uses 4x).")
    flags.DEFINE_integer("max_side", 320, "--max_side of the downscaling runs.")


def make_folder(*, source_dir: Path, target_dir: Path, num_images: int) -> None:
    """Fills target_dir/<class>/ with num_images copies of the JPEGs of source_dir/<class>/."""
    sources = sorted(path for path in source_dir.glob("*/*") if path.suffix.lower() in (".jpg", ".jpeg"))
    for index in range(num_images):
        source = sources[index % len(sources)]
        (target_dir / source.parent.name).mkdir(parents=True, exist_ok=True)
        copy = index // len(sources)
        (target_dir / source.parent.name / f"{source.stem}_{copy}.jpg").write_bytes(
            source.read_bytes() + copy.to_bytes(4, "big")
        )


def run_converter(*, input_dir: Path, output_dir: Path, num_workers: int, max_side: int) -> dict:
    """Runs the CLI once; returns wall seconds, convert-phase rate and peak RSS in MiB."""
    command = [
        sys.executable, "-m", "tfrecords.build", f"--input_dir={input_dir}", f"--output_dir={output_dir}",
        f"--num_workers={num_workers}", f"--max_side={max_side}", "--overwrite", "--num_shards=16",
    ]
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO_ROOT)}
    start = time.monotonic()
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=environment, stdout=subprocess.PIPE, stderr=stderr)
        # wait4 returns this child's own resource usage (its workers included once reaped by it).
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.monotonic() - start
        stdout = process.stdout.read().decode()
        stderr.seek(0)
        log = stderr.read().decode()
    if status != 0:
        raise RuntimeError(f"converter failed:\n{stdout}\n{log[-3000:]}")
    rates = re.findall(r"converting: \d+ of \d+ images, (\d+) images/s", log)
    return {"wall": wall, "convert_rate": float(rates[-1]) if rates else float("nan"),
            "rss_mib": usage.ru_maxrss / 1024, "summary": stdout.strip()}


def main(argv: list) -> None:
    del argv
    num_workers = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as temporary:
        temporary = Path(temporary)
        make_folder(source_dir=Path(FLAGS.source_dir), target_dir=temporary / "images", num_images=FLAGS.num_images)
        print(f"{FLAGS.num_images} JPEGs from {FLAGS.source_dir}, {num_workers} cores")
        print(f"{'workers':>7} {'max_side':>8} {'images':>6} {'wall img/s':>10} {'convert img/s':>13} {'peak RSS MiB':>12}")
        rates = {}
        for max_side in (0, FLAGS.max_side):
            for workers in sorted({1, num_workers}):
                result = run_converter(input_dir=temporary / "images", output_dir=temporary / "output",
                                       num_workers=workers, max_side=max_side)
                rates[(workers, max_side)] = result["convert_rate"]
                print(f"{workers:>7} {max_side or '-':>8} {FLAGS.num_images:>6} "
                      f"{FLAGS.num_images / result['wall']:>10.0f} {result['convert_rate']:>13.0f} "
                      f"{result['rss_mib']:>12.0f}")
        for max_side in (0, FLAGS.max_side):
            ratio = rates[(num_workers, max_side)] / rates[(1, max_side)]
            print(f"scaling 1 -> {num_workers} workers, max_side {max_side or '-'}: {ratio:.2f}x")
        make_folder(source_dir=Path(FLAGS.source_dir), target_dir=temporary / "images4x",
                    num_images=4 * FLAGS.num_images)
        shutil.rmtree(temporary / "output")
        result = run_converter(input_dir=temporary / "images4x", output_dir=temporary / "output",
                               num_workers=num_workers, max_side=FLAGS.max_side)
        print(f"{num_workers:>7} {FLAGS.max_side:>8} {4 * FLAGS.num_images:>6} "
              f"{4 * FLAGS.num_images / result['wall']:>10.0f} {result['convert_rate']:>13.0f} "
              f"{result['rss_mib']:>12.0f}   (4x images: peak RSS should stay flat)")


if __name__ == "__main__":
    define_flags()
    app.run(main)
