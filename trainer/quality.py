"""A data-quality report from backbone embeddings: near-duplicate images and likely label errors.

Every image of every split is read once, in shard order, for two signatures: its embedding by the model's
feature extractor (central crop, as evaluated; features.split_model), and a THUMBNAIL_SIDE x THUMBNAIL_SIDE
grayscale thumbnail of the whole image; both zero-centred where it matters and L2-normalised. Then:
- Near-duplicates: pairs whose thumbnails correlate at `near_duplicate_similarity` or more. Thumbnails, not
  embeddings: measured on flowers_small, a copy resized to 3/4 and re-encoded keeps a thumbnail correlation of
  0.9997 to 1.0 (also at half size, JPEG quality 50), while the closest two different photos reach 0.952; the
  pooled EfficientNet-Lite0 embeddings of the same copies are only 0.86 to 0.97 alike (0.78 to 0.96 centred),
  less than some different photos of one class (0.93). Pairs across splits come first: a test image with a copy
  in train inflates every accuracy measured on it. Exact, in blocks of BLOCK_ROWS rows (N^2 / 2 products of
  THUMBNAIL_SIDE^2 numbers: seconds at 100,000 images).
- Likely label errors, by confident learning (Northcutt et al., 2021): out-of-fold predicted probabilities from
  `folds` logistic regressions on the embeddings (scikit-learn; each never sees the images it scores). A class's
  threshold is the mean probability of that class over the images labelled with it, and an image is off the
  diagonal of the confident joint when, of the classes whose threshold it reaches, the most probable is not its
  given label. Listed: those ("confident"), and the images predicted as another class; suggested label: confident
  learning's class, else the prediction; ranked by the probability of the given label (self-confidence, lowest
  first). Measured on flowers_small with 10 daisies moved into roses (EfficientNet-Lite0 from ImageNet, 224 px;
  tests/test_quality.py): all 10 listed, 5 of them in the first 10 of 59 listed; with the regressions' C at 10
  instead of 100: 9 listed, 4 in the first 10; confident learning's set alone lists 4 of the 10.
Confident learning is the few lines of find_label_issues rather than the cleanlab package, whose AGPL-3.0 licence
would reach every user of this Apache-2.0 tool. The report goes to `<model_dir>/data_quality.json`
`{"label_issues": [{"path", "split", "given", "suggested", "score", "confident"}...], "near_duplicates": [{"paths": [a, b],
"splits": [...], "similarity"}...], ...}` and a PNG of the top suspects (data_quality.png).
"""

import dataclasses
import json
import warnings

import keras
import numpy as np
import tensorflow as tf
import threadpoolctl
from sklearn import exceptions, linear_model, model_selection

from tfrecords import schema
from trainer import data, features, report

QUALITY_JSON = "data_quality.json"
QUALITY_PNG = "data_quality.png"
BLOCK_ROWS = 1024
THUMBNAIL_SIDE = 16
# Inverse L2 strength of the logistic regressions: the embeddings have unit length, so their logits are small
# unless the weights may grow.
LOGISTIC_C = 100.0
# Measured on the planted-error test: 50, 100, 200 and 500 iterations list the same images in the same order;
# on features that separate poorly (random weights) more iterations only cost time (18 s at 500 for 500 images).
LOGISTIC_MAX_ITER = 100
PNG_ISSUES = 12
PNG_PAIRS = 6


@dataclasses.dataclass(frozen=True)
class QualityOptions:
    """The report's settings (the --data_quality_* flags).

    near_duplicate_similarity: thumbnail correlation from which two images count as near-duplicates.
    folds: logistic regressions (folds) whose out-of-fold predictions score the labels.
    max_listed: most label issues and most near-duplicate pairs written to the report.
    max_images: larger folders are reported on a stable sample of this many images (by a hash of the path), so
        the report's memory (about 5 KiB an image) and time (near-duplicates compare every pair) stay bounded.
    batch_size: images per feature-extractor call.
    seed: seed of the folds.
    """

    near_duplicate_similarity: float = 0.98
    folds: int = 5
    max_listed: int = 200
    max_images: int = 200_000
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.near_duplicate_similarity <= 1:
            raise ValueError(
                f"--data_quality_similarity={self.near_duplicate_similarity} is not in (0, 1]; e.g. 0.98"
            )
        if self.folds < 2:
            raise ValueError(f"--data_quality_folds={self.folds} must be at least 2, e.g. 5")
        if self.max_listed < 1 or self.batch_size < 1 or self.max_images < 2:
            raise ValueError("the data-quality report's max_listed and batch_size must be at least 1, max_images 2")


@dataclasses.dataclass
class Embeddings:
    """Every image's normalised embedding and thumbnail, label, path (relative to the input folder) and split."""

    vectors: np.ndarray
    labels: np.ndarray
    paths: list
    splits: list
    thumbnails: np.ndarray | None = None


def embed_splits(
    *, model: keras.Model, data_dir: str, manifest: dict, image_size: int, batch_size: int, share: float = 1.0,
) -> Embeddings:
    """Embeds the images of every split with the model's feature extractor, in shard order, with their thumbnails.

    share: the fraction of the images kept, chosen by a hash of the path (the same images every time).
    """
    feature_model, _ = features.split_model(model)
    embed = tf.function(lambda images: feature_model(images, training=False))
    class_names = manifest["classes"]

    def prepare(serialized):
        record = data.parse_record(serialized, class_names)
        image = data.decode_and_resize(record["image/encoded"], image_size)
        # The converter stores JPEGs: an eighth-scale decode is plenty for a 16 x 16 thumbnail.
        small = tf.cast(tf.io.decode_jpeg(record["image/encoded"], channels=1, ratio=8), tf.float32)
        thumbnail = tf.reshape(tf.image.resize(small, [THUMBNAIL_SIDE, THUMBNAIL_SIDE], method="area"), [-1])
        return image, thumbnail, record["image/class/label"], record["image/source"]

    vectors, thumbnails, labels, paths, splits = [], [], [], [], []
    for split in manifest["splits"]:
        dataset = tf.data.TFRecordDataset(data.shard_paths(data_dir, manifest, split))
        if share < 1:
            buckets = 2**30
            dataset = dataset.filter(lambda serialized: tf.strings.to_hash_bucket_fast(
                schema.parse_example(serialized)["image/source"], buckets) < int(share * buckets))
        dataset = dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(2)
        for images, batch_thumbnails, batch_labels, batch_paths in dataset:
            vectors.append(keras.ops.convert_to_numpy(embed(images)).astype(np.float32))
            thumbnails.append(batch_thumbnails.numpy())
            labels.append(batch_labels.numpy())
            paths.extend(path.decode("utf-8") for path in batch_paths.numpy())
            splits.extend([split] * len(batch_paths))
    thumbnails = np.concatenate(thumbnails)
    thumbnails -= thumbnails.mean(axis=1, keepdims=True)  # a correlation: brightness and contrast do not count
    return Embeddings(vectors=_unit_rows(np.concatenate(vectors)), labels=np.concatenate(labels).astype(np.int64),
                      paths=paths, splits=splits, thumbnails=_unit_rows(thumbnails))


def _unit_rows(rows: np.ndarray) -> np.ndarray:
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def find_near_duplicates(embeddings: Embeddings, *, similarity: float) -> list:
    """Pairs of images whose thumbnails correlate at `similarity` or more, across splits first, then closest first."""
    vectors, pairs = embeddings.thumbnails, []
    for start in range(0, len(vectors), BLOCK_ROWS):
        block = vectors[start : start + BLOCK_ROWS] @ vectors.T
        rows, columns = np.nonzero(block >= similarity)
        for row, column in zip(rows + start, columns):
            if column > row:  # each pair once, never an image with itself
                pairs.append((float(block[row - start, column]), int(row), int(column)))
    entries = [
        {"paths": [embeddings.paths[a], embeddings.paths[b]], "splits": [embeddings.splits[a], embeddings.splits[b]],
         "similarity": round(value, 4)}
        for value, a, b in pairs
    ]
    return sorted(entries, key=lambda entry: (entry["splits"][0] == entry["splits"][1], -entry["similarity"], entry["paths"]))


def out_of_fold_probabilities(embeddings: Embeddings, *, num_classes: int, folds: int, seed: int) -> np.ndarray:
    """Each image's class probabilities from a logistic regression trained on the other folds only.

    scikit-learn's cross_val_predict; folds stratified by label when every class has an image per fold. With one
    BLAS thread: measured on 498 embeddings of width 1280 (5 folds, 2 cores, TensorFlow loaded), 1.9 s with
    OpenBLAS's two threads, 0.17 s with one (the products are too small to share).
    """
    labels = embeddings.labels
    smallest = min(int(np.sum(labels == label)) for label in np.unique(labels))
    splitter = (model_selection.StratifiedKFold if smallest >= folds else model_selection.KFold)(
        n_splits=folds, shuffle=True, random_state=seed
    )
    classifier = linear_model.LogisticRegression(C=LOGISTIC_C, max_iter=LOGISTIC_MAX_ITER)
    with warnings.catch_warnings(), threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        # A fold without some class: its probabilities for that class are 0, which confident learning allows.
        warnings.simplefilter("ignore", RuntimeWarning)
        # Stopping at LOGISTIC_MAX_ITER: the ranking, not exact probabilities, is what the report needs.
        warnings.simplefilter("ignore", exceptions.ConvergenceWarning)
        probabilities = model_selection.cross_val_predict(
            classifier, embeddings.vectors, labels, cv=splitter, method="predict_proba"
        )
    # cross_val_predict has a column per class present in the labels; classes without images get zeros.
    full = np.zeros((len(labels), num_classes), np.float32)
    full[:, np.unique(labels)] = probabilities
    return full


def find_label_issues(embeddings: Embeddings, probabilities: np.ndarray, *, class_names: list) -> list:
    """Images whose given label looks wrong, lowest self-confidence first (see the module docstring)."""
    labels = embeddings.labels
    # Confident learning's per-class thresholds: the mean probability of a class over the images given it.
    thresholds = np.array([
        probabilities[labels == label, label].mean() if np.any(labels == label) else 1.0
        for label in range(len(class_names))
    ])
    issues = []
    for index, (given, row) in enumerate(zip(labels, probabilities)):
        # The classes this image is confidently in; its cell of the confident joint is the likeliest of them.
        above = [label for label in range(len(class_names)) if row[label] >= thresholds[label]]
        joint = max(above, key=lambda label: row[label]) if above else None
        predicted = int(np.argmax(row))
        confident = joint is not None and joint != int(given)
        if not confident and predicted == given:
            continue
        issues.append({
            "path": embeddings.paths[index], "split": embeddings.splits[index], "given": class_names[given],
            "suggested": class_names[joint if confident else predicted], "score": round(float(row[given]), 4),
            "confident": confident,
        })
    return sorted(issues, key=lambda issue: (issue["score"], issue["path"]))


def make_report(*, model: keras.Model, data_dir: str, manifest: dict, image_size: int, options: QualityOptions) -> dict:
    """Embeds every image and returns the report dict (see the module docstring)."""
    total = sum(split["num_examples"] for split in manifest["splits"].values())
    share = min(1.0, options.max_images / total)
    embeddings = embed_splits(model=model, data_dir=data_dir, manifest=manifest, image_size=image_size,
                              batch_size=options.batch_size, share=share)
    class_names = manifest["classes"]
    probabilities = out_of_fold_probabilities(
        embeddings, num_classes=len(class_names), folds=options.folds, seed=options.seed,
    )
    issues = find_label_issues(embeddings, probabilities, class_names=class_names)
    pairs = find_near_duplicates(embeddings, similarity=options.near_duplicate_similarity)
    return {
        "data_dir": data_dir, "num_images": len(embeddings.paths), "num_images_in_data": total,
        "sampled": share < 1, "folds": options.folds,
        "near_duplicate_similarity": options.near_duplicate_similarity,
        "out_of_fold_accuracy": round(float(np.mean(np.argmax(probabilities, axis=1) == embeddings.labels)), 4),
        "num_label_issues": len(issues), "num_near_duplicates": len(pairs),
        "num_near_duplicates_across_splits": sum(pair["splits"][0] != pair["splits"][1] for pair in pairs),
        "label_issues": issues[: options.max_listed], "near_duplicates": pairs[: options.max_listed],
    }


def write_report(*, quality: dict, output_dir: str, data_dir: str, manifest: dict, image_size: int) -> str:
    """Writes data_quality.json and data_quality.png into output_dir; returns the one-line summary."""
    tf.io.gfile.makedirs(output_dir)
    schema.write_text(tf.io.gfile.join(output_dir, QUALITY_JSON), json.dumps(quality, indent=1))
    issues, pairs = quality["label_issues"][:PNG_ISSUES], quality["near_duplicates"][:PNG_PAIRS]
    wanted = {issue["path"]: issue["split"] for issue in issues}
    wanted.update((path, split) for pair in pairs for path, split in zip(pair["paths"], pair["splits"]))
    thumbnails = read_images(data_dir=data_dir, manifest=manifest, splits_of=wanted, image_size=image_size)
    report.plot_quality(issues=issues, pairs=pairs, thumbnails=thumbnails,
                        path=tf.io.gfile.join(output_dir, QUALITY_PNG))
    return summarize(quality=quality, path=tf.io.gfile.join(output_dir, QUALITY_JSON))


def read_images(*, data_dir: str, manifest: dict, splits_of: dict, image_size: int) -> dict:
    """The decoded images of the given source paths (source path -> its split): reads only those splits' shards,
    decodes only those images, and stops once all are found."""
    found = {}
    for split in (split for split in manifest["splits"] if split in splits_of.values()):
        for serialized in tf.data.TFRecordDataset(data.shard_paths(data_dir, manifest, split)):
            record = schema.parse_example(serialized)
            path = record["image/source"].numpy().decode("utf-8")
            if splits_of.get(path) == split and path not in found:
                found[path] = data.decode_and_resize(record["image/encoded"], image_size).numpy().astype(np.uint8)
                if len(found) == len(splits_of):
                    return found
    return found


def summarize(*, quality: dict, path: str) -> str:
    """The one line printed at the end of a run."""
    issues, pairs = quality["label_issues"], quality["near_duplicates"]
    top_issue = f" (first: {issues[0]['path']} looks like {issues[0]['suggested']!r})" if issues else ""
    across = quality["num_near_duplicates_across_splits"]
    top_pair = f" (first: {pairs[0]['paths'][0]} ~ {pairs[0]['paths'][1]})" if pairs else ""
    sample = f" (a sample of the {quality['num_images_in_data']})" if quality.get("sampled") else ""
    return (
        f"data quality of {quality['num_images']} images{sample}: {quality['num_label_issues']} likely label errors{top_issue}, "
        f"{quality['num_near_duplicates']} near-duplicate pairs, {across} across splits{top_pair}; see {path}"
    )
