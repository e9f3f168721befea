r"""Growth curve: wall time and peak memory of each stage as the image folder grows (issue 16).

    python -m benchmarks.scale --sizes=10000,50000,200000 --work_dir=/tmp/scale

For each kind of folder (--kinds) and size it writes (once) a folder of that many small JPEGs in 10 classes:
"unique" (24 x 24 px, each class one random-noise image, files told apart by a JPEG comment) or "similar"
(64 x 64 px smooth grey gradients, about horizontal or about vertical, plus noise, classes drawn at random: each
image is a near-duplicate of about half the folder, as product shots on white or video frames are). Then it
measures (--stages):
- local: the local converter (python -m tfrecords.build, all cores): wall time and peak RSS of its largest process;
- beam: the Beam converter (python -m tfrecords.beam_build) on Beam's portable runner with a local job service and
  an external worker pool: three kinds of process, as on Dataflow. "launcher" is this machine's part (what
  runs where the user types the command); "runner" stands for the Dataflow service (here its shuffle is in
  its memory, and it hands a worker a whole stage's data as one bundle, where Dataflow bounds bundles);
  "workers" are the SDK workers. Peak RSS of each, sampled every SAMPLE_SECONDS. Twice: given a --file_list
  (the path for buckets of millions of objects: the workers list) and given the local folder (the launcher
  lists it, as it does every local folder);
- train: one run of the default trainer (python -m trainer.train: both phases, the data-quality report, the
  export), with only what makes it feasible on 2 CPU cores changed (TRAIN_FLAGS: a random backbone of feature
  width 1280 at 32 px, batch 256): wall time, peak RSS, and from the run's metrics.json and data_quality.json
  the report's seconds, its share of the run, the images it covered, and the phase-1 feature caching's seconds.
  The trainer's "data quality of ..." line is printed with each row;
- train_spilled (not by default): the older measurement, phase 1 only (1 epoch, no phase 2, no data-quality
  report) with the cached features in memory and spilled (--feature_cache_memory_mb=SPILL_BUDGET_MB), as in the
  docs/scale-and-capacity.md's older rows.
Prints one row per kind and size, then a table per kind with the slope of each column between the smallest
and the largest size (milliseconds or KiB per file, a share's points per 1,000 files): a flat column has a slope
near 0. Timings on a shared 2-core machine vary by some percent between runs; the slopes of memory do not.
psutil (installed with tensorflow-datasets) samples the memory.
"""

import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
from absl import app, flags
from PIL import Image

from benchmarks import common

FLAGS = flags.FLAGS
flags.DEFINE_string("sizes", "10000,50000,200000", "Folder sizes (files), comma-separated, smallest first.")
flags.DEFINE_string("work_dir", "/tmp/scale_benchmark", "Where the generated folders and outputs go (kept for reruns).")
flags.DEFINE_list("stages", ["local", "beam", "train"],
                  "Stages to measure: local, beam, train (the default trainer), train_spilled (the older phase-1-only "
                  "runs, features in memory and spilled).")
flags.DEFINE_list("kinds", ["unique", "similar"], "Kinds of generated folder to measure: unique, similar.")

NUM_CLASSES = 10
SAMPLE_SECONDS = 0.2
SPILL_BUDGET_MB = 4  # every split spilled at every size (the smallest, 1,000 test images, is 5 MiB)
JOB_SERVICE_PORT = 18099
WORKER_POOL_PORT = 18100
FEATURE_WIDTH = 1280
STAGES = ("local", "beam", "train", "train_spilled")
KINDS = ("unique", "similar")
# The "similar" kind: SIMILAR_SIDE px grey gradients, one of these directions (degrees from left-to-right) each.
# Two ramps at angles a and b correlate at cos(a - b), so 0 and 8 degrees (0.990) make one group of
# near-duplicates and 90 and 98 another, uncorrelated with the first: about half of all pairs are near-duplicates.
SIMILAR_SIDE = 64
SIMILAR_DIRECTIONS_DEGREES = (0, 8, 90, 98)
SIMILAR_NOISE_STD = 6.0  # grey levels: the pixels of every image differ, its thumbnail barely does
SIMILAR_BATCH = 1000  # images generated per numpy call (1000 x 64 x 64 x 3 float32 is 49 MB)
# The default trainer, with only what makes it feasible on 2 CPU cores changed: a tiny random backbone file
# (--weights=imagenet loads the file as it is; a .keras file needs --preprocess) at 32 px, and a large batch.
# Everything else is the default: 10 phase-1 epochs on cached features, 3 phase-2 epochs, the data-quality
# report, the export (SavedModel and model.keras; no TFLite file by default).
TRAIN_FLAGS = ("--weights=imagenet", "--preprocess=tf", "--image_size=32", "--batch_size=256")
QUALITY_FILE = "data_quality.json"  # written by the trainer (trainer/reports/quality.py QUALITY_JSON)
QUALITY_LINE_START = "data quality of"  # the trainer's one-line summary of that report
REPORT_PARTS_START = "data-quality report"  # the trainer's log lines of the report's parts and their seconds


def folder_suffix(kind: str, size: int) -> str:
    """The name part of a kind and size's folders under --work_dir: images_<suffix>, tfrecords_<suffix>, model_<suffix>.

    The unique kind keeps the names it had before there were kinds ("10000"), so earlier work dirs are reused.
    """
    return f"{size}" if kind == "unique" else f"{kind}_{size}"


def write_folder(folder: str, num_files: int, kind: str = "unique") -> str:
    """Writes a folder of num_files JPEGs of the given kind (unique or similar) into NUM_CLASSES class folders, once.

    A ".complete" marker, written last, says the folder is whole: a later call returns at once, an interrupted
    one is written again (the same files: the generators are seeded).
    """
    if os.path.exists(os.path.join(folder, ".complete")):
        return folder
    writers = {"unique": write_unique_files, "similar": write_similar_files}
    writers[kind](folder, num_files)
    open(os.path.join(folder, ".complete"), "w").close()
    return folder


def write_unique_files(folder: str, num_files: int) -> None:
    """Writes num_files unique 24 x 24 JPEGs, file i into class i % NUM_CLASSES.

    Each file is its class's JPEG with a comment segment naming the file: the same pixels, different bytes, so
    no file is a duplicate (the converter keeps them all) and writing 200,000 takes seconds.
    """
    rng = np.random.default_rng(0)
    for label in range(NUM_CLASSES):
        pixels = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
        encoded = io.BytesIO()
        Image.fromarray(pixels).save(encoded, format="JPEG", quality=90)
        jpeg = encoded.getvalue()
        class_folder = os.path.join(folder, f"class_{label:02d}")
        os.makedirs(class_folder, exist_ok=True)
        for index in range(label, num_files, NUM_CLASSES):
            comment = f"file {index}".encode()
            segment = b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment
            with open(os.path.join(class_folder, f"{index:07d}.jpg"), "wb") as image_file:
                image_file.write(jpeg[:2] + segment + jpeg[2:])  # right after the start-of-image marker


def similar_pixels(rng: np.random.Generator, count: int) -> np.ndarray:
    """count SIMILAR_SIDE x SIMILAR_SIDE grey gradients plus noise, uint8 [count, side, side, 3].

    Each image ramps from a dark to a light grey (both drawn per image: a correlation ignores brightness and
    contrast, the pixels do not) along one of SIMILAR_DIRECTIONS_DEGREES, plus SIMILAR_NOISE_STD of noise per
    pixel and channel.
    """
    coordinates = np.linspace(-1.0, 1.0, SIMILAR_SIDE, dtype=np.float32)
    x, y = coordinates[np.newaxis, np.newaxis, :], coordinates[np.newaxis, :, np.newaxis]
    angles = np.radians(rng.choice(SIMILAR_DIRECTIONS_DEGREES, count)).astype(np.float32)[:, np.newaxis, np.newaxis]
    cosines, sines = np.cos(angles), np.sin(angles)
    # From 0 to 1 across the image in the ramp's direction (|cos| + |sin| is the ramp's half-range on the square).
    ramps = ((cosines * x + sines * y) / (np.abs(cosines) + np.abs(sines)) + 1.0) / 2.0
    dark = rng.uniform(20, 60, (count, 1, 1)).astype(np.float32)
    light = rng.uniform(190, 235, (count, 1, 1)).astype(np.float32)
    grey = dark + (light - dark) * ramps
    noise = rng.standard_normal((count, SIMILAR_SIDE, SIMILAR_SIDE, 3), dtype=np.float32) * SIMILAR_NOISE_STD
    return np.clip(grey[..., np.newaxis] + noise + 0.5, 0, 255).astype(np.uint8)


def write_similar_files(folder: str, num_files: int) -> None:
    """Writes num_files near-identical JPEGs (similar_pixels), each into a class drawn at random (labels carry no
    signal). Every image has noise of its own and a JPEG comment naming its file, so no two files share bytes.

    Pixels in numpy batches, each image encoded on its own (no pool of shared variants): 200,000 take about two
    minutes on one core.
    """
    rng = np.random.default_rng(0)
    labels = rng.integers(0, NUM_CLASSES, num_files)
    for label in range(NUM_CLASSES):
        os.makedirs(os.path.join(folder, f"class_{label:02d}"), exist_ok=True)
    for start in range(0, num_files, SIMILAR_BATCH):
        pixels = similar_pixels(rng, min(SIMILAR_BATCH, num_files - start))
        for index, image in enumerate(pixels, start=start):
            path = os.path.join(folder, f"class_{labels[index]:02d}", f"{index:07d}.jpg")
            Image.fromarray(image).save(path, format="JPEG", quality=90, comment=f"file {index}")


class PeakMemory:
    """Samples the resident memory of process trees in a thread; peak() gives each tree's peak, in MiB.

    A tree's memory is its largest process's (a forked worker shares its parent's pages, so a sum would count
    them twice), or with summed=True the sum of its processes (separate interpreters, like Beam's SDK workers).
    """

    def __init__(self, processes: dict, summed: tuple = ()):
        self.processes, self.summed = processes, summed
        self.peaks, self.running = {name: 0 for name in processes}, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self):
        while self.running:
            for name, process in self.processes.items():
                try:
                    tree = [process, *process.children(recursive=True)]
                    sizes = [member.memory_info().rss for member in tree if member.is_running()]
                except psutil.Error:
                    continue
                self.peaks[name] = max(self.peaks[name], sum(sizes) if name in self.summed else max(sizes, default=0))
            time.sleep(SAMPLE_SECONDS)

    def peak(self) -> dict:
        self.running = False
        self.thread.join()
        return {name: value / 2**20 for name, value in self.peaks.items()}


def run_measured(command: list, *, extra: dict | None = None) -> tuple:
    """Runs command; returns (seconds, {"main": peak MiB of its largest process, **peaks of the extra processes},
    its stdout followed by its stderr)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=common.REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = PeakMemory({"main": psutil.Process(process.pid), **(extra or {})}, summed=("workers",))
    stdout, stderr = process.communicate()
    seconds, peaks = time.perf_counter() - started, sampler.peak()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} failed:\n{stderr[-3000:]}")
    return seconds, peaks, stdout + stderr


def measure_local(folder: str, output_dir: str) -> dict:
    seconds, peaks, _ = run_measured([
        sys.executable, "-m", "tfrecords.build", f"--input_dir={folder}", f"--output_dir={output_dir}", "--overwrite",
    ])
    return {"local s": seconds, "local MiB": peaks["main"]}


def write_file_list(folder: str) -> str:
    """Writes (once) the folder's files as a --file_list, as an object inventory would list a bucket."""
    path = folder.rstrip("/") + ".files.txt"
    if not os.path.exists(path):
        with open(path, "w") as list_file:
            for root, _, names in sorted(os.walk(folder)):
                list_file.writelines(f"{os.path.relpath(os.path.join(root, name), folder)}\n" for name in sorted(names)
                                     if name.endswith(".jpg"))
    return path


def measure_beam(folder: str, output_dir: str, *, file_list: str | None) -> dict:
    """The Beam converter with its runner and workers in processes of their own (started fresh for each run).

    With file_list the workers list the files (the launcher splits the list into byte ranges); without it the
    launcher lists the local folder itself (its link policy needs one view of the folder).
    """
    services = [
        subprocess.Popen([sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main",
                          f"--port={JOB_SERVICE_PORT}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
                          f"--service_port={WORKER_POOL_PORT}"], cwd=common.REPO_ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    name = "beam, file list" if file_list else "beam, folder"
    try:
        time.sleep(5)  # both services listening
        if any(service.poll() is not None for service in services):
            raise RuntimeError(f"the Beam job service or worker pool did not start: ports {JOB_SERVICE_PORT}, "
                               f"{WORKER_POOL_PORT} in use?")
        seconds, peaks, _ = run_measured(
            [sys.executable, "-m", "tfrecords.beam_build", f"--input_dir={folder}", f"--output_dir={output_dir}",
             "--overwrite", "--runner=PortableRunner", f"--job_endpoint=localhost:{JOB_SERVICE_PORT}",
             "--environment_type=EXTERNAL", f"--environment_config=localhost:{WORKER_POOL_PORT}",
             *([f"--file_list={file_list}"] if file_list else [])],
            extra={"runner": psutil.Process(services[0].pid), "workers": psutil.Process(services[1].pid)},
        )
    finally:
        for service in services:
            service.terminate()
            service.wait()
    return {f"{name} s": seconds, f"{name}: launcher MiB": peaks["main"], f"{name}: runner MiB": peaks["runner"],
            f"{name}: workers MiB": peaks["workers"]}


def backbone_file(work_dir: str) -> str:
    """A random convolutional backbone of feature width FEATURE_WIDTH (what phase 1 caches per image)."""
    path = os.path.join(work_dir, "backbone_width_1280.keras")
    if not os.path.exists(path):
        import keras

        keras.Sequential([
            keras.Input((None, None, 3)),
            keras.layers.Conv2D(32, 3, strides=4, activation="relu"),
            keras.layers.Conv2D(FEATURE_WIDTH, 1, activation="relu"),
        ], name="width_1280").save(path)
    return path


def measure_train(data_dir: str, model_dir: str, backbone: str) -> tuple:
    """One run of the default trainer with TRAIN_FLAGS.

    Returns:
        (the row's columns, the run's time_seconds from metrics.json, the trainer's "data quality of" line).
    """
    shutil.rmtree(model_dir, ignore_errors=True)  # a new run each time, not a resumed one
    seconds, peaks, output = run_measured([
        sys.executable, "-m", "trainer.train", f"--data_dir={data_dir}", f"--model_dir={model_dir}",
        f"--backbone={backbone}", *TRAIN_FLAGS,
    ])
    with open(os.path.join(model_dir, "metrics.json")) as metrics_file:
        times = json.load(metrics_file)["time_seconds"]
    with open(os.path.join(model_dir, QUALITY_FILE)) as quality_file:
        quality = json.load(quality_file)
    report_seconds = times["data-quality report"]
    row = {
        "train s": seconds,
        "train MiB": peaks["main"],
        "report s": report_seconds,
        "report %": 100 * report_seconds / times["total"],
        "report images": quality["num_images"],
        # One stage per phase that caches features; only phase 1 does by default.
        "phase1 features s": sum(value for name, value in times.items() if "caching backbone features" in name),
    }
    # Logged and printed (after the log prefix, if any): the first one found is the line. The report's parts
    # (its own pass, label issues, near-duplicates, paths, PNG) are logged with their seconds: printed too.
    lines = output.splitlines()
    quality_lines = [line[line.index(QUALITY_LINE_START):] for line in lines if QUALITY_LINE_START in line]
    parts = [line[line.index(REPORT_PARTS_START):].split("; data quality of")[0] for line in lines
             if REPORT_PARTS_START in line]
    summary = quality_lines[0] if quality_lines else "(no data-quality line in the trainer's output)"
    return row, times, "\n  ".join([*parts, summary])


def measure_train_spilled(data_dir: str, model_root: str, backbone: str) -> dict:
    """The older measurement: phase 1 only (1 epoch, no phase 2), features in memory and spilled.

    Without the data-quality report, which came after the older rows of this measurement (docs/scale-and-capacity.md).
    """
    row = {}
    for name, budget in (("memory", 4096), ("spilled", SPILL_BUDGET_MB)):
        shutil.rmtree(f"{model_root}_{name}", ignore_errors=True)  # a new run each time, not a resumed one
        seconds, peaks, _ = run_measured([
            sys.executable, "-m", "trainer.train", f"--data_dir={data_dir}", f"--model_dir={model_root}_{name}",
            f"--backbone={backbone}", "--weights=imagenet", "--preprocess=tf", "--image_size=32", "--batch_size=256",
            "--epochs=1", "--fine_tune_epochs=0", f"--feature_cache_memory_mb={budget}", "--nodata_quality",
        ])
        row[f"train {name} s"], row[f"train {name} MiB"] = seconds, peaks["main"]
    return row


def measure(kind: str, size: int) -> tuple:
    """Writes (once) the kind and size's folder and measures the --stages on it.

    Returns:
        (the row: column -> number, the lines to print under it).
    """
    suffix = folder_suffix(kind, size)
    folder = write_folder(os.path.join(FLAGS.work_dir, f"images_{suffix}"), size, kind)
    local_dir = os.path.join(FLAGS.work_dir, f"tfrecords_{suffix}")
    row, notes = {}, []
    if "local" in FLAGS.stages:
        row.update(measure_local(folder, local_dir))
    if "beam" in FLAGS.stages:
        beam_dir = os.path.join(FLAGS.work_dir, f"tfrecords_beam_{suffix}")
        row.update(measure_beam(folder, beam_dir, file_list=write_file_list(folder)))
        row.update(measure_beam(folder, beam_dir, file_list=None))
    if ("train" in FLAGS.stages or "train_spilled" in FLAGS.stages) and not os.path.exists(
            os.path.join(local_dir, "manifest.json")):
        row.update(measure_local(folder, local_dir))
    model_dir = os.path.join(FLAGS.work_dir, f"model_{suffix}")
    if "train" in FLAGS.stages:
        train_row, times, quality_line = measure_train(local_dir, model_dir, backbone_file(FLAGS.work_dir))
        row.update(train_row)
        notes.append("  time_seconds: " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in times.items()))
        notes.append(f"  {quality_line}")
    if "train_spilled" in FLAGS.stages:
        row.update(measure_train_spilled(local_dir, model_dir, backbone_file(FLAGS.work_dir)))
    return row, notes


def main(argv):
    del argv
    sizes = [int(size) for size in FLAGS.sizes.split(",")]
    for name, values, known in (("--stages", FLAGS.stages, STAGES), ("--kinds", FLAGS.kinds, KINDS)):
        if unknown := [value for value in values if value not in known]:
            raise app.UsageError(f"{name}: {unknown} not among {list(known)}")
    os.makedirs(FLAGS.work_dir, exist_ok=True)
    rows, notes = {}, {}
    for kind in FLAGS.kinds:
        for size in sizes:
            row, notes[(kind, size)] = measure(kind, size)
            rows[(kind, size)] = row
            print(f"{kind} {size} files: " + ", ".join(f"{key} {value:.1f}" for key, value in row.items()), flush=True)
            if notes[(kind, size)]:
                print("\n".join(notes[(kind, size)]), flush=True)
    for kind in FLAGS.kinds:
        print_table(kind, {size: rows[(kind, size)] for size in sizes}, {size: notes[(kind, size)] for size in sizes})
    with open(os.path.join(FLAGS.work_dir, "scale.json"), "w") as result_file:
        json.dump({f"{kind} {size}": row for (kind, size), row in rows.items()}, result_file, indent=1)


def print_table(kind: str, rows: dict, notes: dict) -> None:
    """One kind's table: a column per size, a row per measurement, its slope per file; then each size's notes."""
    sizes = sorted(rows)
    columns = list(rows[sizes[0]])
    width = max(len(column) for column in columns) + 2
    print(f"\n{kind:<{width}}" + "".join(f"{size:>12,}" for size in sizes) + "   slope per file")
    for column in columns:
        values = [rows[size][column] for size in sizes]
        slope = (values[-1] - values[0]) / (sizes[-1] - sizes[0]) if len(sizes) > 1 else float("nan")
        print(f"{column:<{width}}" + "".join(f"{value:12.1f}" for value in values) + f"   {slope_text(column, slope)}")
    for size in sizes:
        if notes[size]:
            print(f"{kind} {size:,}:\n" + "\n".join(notes[size]))


def slope_text(column: str, slope: float) -> str:
    """A column's change per file in a unit that reads: ms for seconds, KiB for MiB, points per 1,000 files for %."""
    if column.endswith(" s"):
        return f"{slope * 1000:8.3f} ms"
    if column.endswith(" MiB"):
        return f"{slope * 1024:8.3f} KiB"
    if column.endswith(" %"):
        return f"{slope * 1000:8.3f} points per 1,000 files"
    return f"{slope:8.3f}"


if __name__ == "__main__":
    app.run(main)
