"""A data-quality report from backbone embeddings: likely label errors and near-duplicate images, in bounded memory.

Every image of every split is seen once, in each split's evaluation order, for two signatures: its embedding by
the model's feature extractor (central crop, as evaluated; features.split_model) and a THUMBNAIL_SIDE x
THUMBNAIL_SIDE grayscale thumbnail of the whole image. A training run collects them from phase 1's own feature
pass (transfer.cached_feature_data: the unaugmented view of each training image is one of its cached views, the
validation split is computed unaugmented anyway), so the report's only backbone pass of its own is over the
splits phase 1 does not read (test); elsewhere (`python -m trainer.data_quality`, multi-worker runs, phase 1
without cached features) embed_splits makes one pass over every split. A Collector keeps per image the
embedding (float16, at most EMBEDDING_BUDGET_MB for all of them, and at most MAX_EMBEDDING_WIDTH columns: past that,
projected onto its leading principal components), 256 bytes of thumbnail, label, split and position: about 1 KiB an image at most, and nothing that
grows with pairs. Then:
- Near-duplicates: images whose thumbnails correlate at `near_duplicate_similarity` or more. Thumbnails, not
  embeddings: measured on flowers_small, a copy resized to 3/4 and re-encoded keeps a thumbnail correlation of
  0.9997 to 1.0 (also at half size, JPEG quality 50), while the closest two different photos reach 0.952; the
  pooled EfficientNet-Lite0 embeddings of the same copies are only 0.86 to 0.97 alike, less than some different
  photos of one class (0.93). Each image's NEIGHBOURS nearest thumbnails are found with faiss (exactly up to
  EXACT_SEARCH_MAX_IMAGES images, past that with an HNSW graph, never comparing every pair), the similarity of
  each candidate pair is computed exactly, and the pairs at the threshold are joined into groups (connected
  components). The report lists the groups (largest first: "these 4,000 images are one near-duplicate group"),
  counts the validation and test images whose group holds a training image (each one inflates the accuracy
  measured on it), and lists at most `max_listed` pairs, across splits first. A group larger than NEIGHBOURS + 1
  is found whole, but not every pair in it is listed or counted: its pairs are counted as those among each
  image's nearest neighbours.
- Likely label errors, by confident learning (Northcutt et al., 2021): out-of-fold predicted probabilities from
  `folds` logistic regressions on the embeddings (scikit-learn; each never sees the images it scores, and learns
  from at most MAX_FIT_ROWS of the others, so its time does not grow with the folder). A class's threshold is the
  mean probability of that class over the images labelled with it, and an image is off the diagonal of the
  confident joint when, of the classes whose threshold it reaches, the most probable is not its given label.
  Counted: those ("confident") and the images predicted as another class; listed (at most `max_listed`): the
  lowest probabilities of the given label first, with confident learning's class, else the prediction, as the
  suggested label. Measured on flowers_small with 10 daisies moved into roses (EfficientNet-Lite0 from ImageNet,
  224 px; tests/test_quality.py): all 10 listed, 5 of them in the first 10 of 59 listed.
Confident learning is the few lines of find_label_issues rather than the cleanlab package, whose AGPL-3.0 licence
would reach every user of this Apache-2.0 tool. Paths are read back only for what is listed. The report goes to
`<model_dir>/data_quality.json` (see make_report) and a PNG of the top suspects (data_quality.png).
"""

import dataclasses
import json
import time
import warnings

import faiss
import keras
import numpy as np
import psutil
import tensorflow as tf
import threadpoolctl
from absl import logging
from scipy import sparse
from scipy.sparse import csgraph
from sklearn import exceptions, linear_model, model_selection

from tfrecords import schema
from trainer.fit import features
from trainer.input import data
from trainer.reports import metrics

QUALITY_JSON = "data_quality.json"
QUALITY_PNG = "data_quality.png"
THUMBNAIL_SIDE = 16
# Embeddings wider than MAX_EMBEDDING_WIDTH, or all of them together past EMBEDDING_BUDGET_MB, are stored projected
# onto their leading principal components (fitted on the first PROJECTION_FIT_ROWS images): the regressions' time
# grows with the width (6.2 s for 2,000 images at Lite0's 1280, 5 folds, one thread).
MAX_EMBEDDING_WIDTH = 256
EMBEDDING_BUDGET_MB = 64  # stored as float16: 256 columns up to 131,072 images, 160 at 200,000
MIN_PROJECTED_WIDTH = 32
PROJECTION_FIT_ROWS = 4096
# Nearest thumbnails looked at per image. Exact search (every pair, in BLAS) up to EXACT_SEARCH_MAX_IMAGES; an
# HNSW graph past it (faiss IndexHNSWSQ: 8-bit vectors, HNSW_LINKS links per image; candidates then re-scored exactly).
NEIGHBOURS = 16
EXACT_SEARCH_MAX_IMAGES = 20_000
# Measured on 50,000 thumbnails (two dense clusters / random): 16 links, 40 and 64 took 9.1 s / 16.7 s to build and
# 12.8 s / 12.7 s to search; 8, 20 and 32 took 3.1 / 3.8 s and 2.3 / 3.2 s, with the same groups in the tests.
HNSW_LINKS = 8
HNSW_EF_CONSTRUCTION = 20
HNSW_EF_SEARCH = 32
SEARCH_ROWS = 512
GROUP_EXAMPLES = 6
# Training rows of each fold's regression at most (a random sample of the other folds).
MAX_FIT_ROWS = 20_000
# Inverse L2 strength of the logistic regressions: the embeddings have unit length, so their logits are small
# unless the weights may grow.
LOGISTIC_C = 100.0
# Measured on the planted-error test: 50, 100, 200 and 500 iterations list the same images in the same order;
# on features that separate poorly (random weights) more iterations only cost time (18 s at 500 for 500 images).
LOGISTIC_MAX_ITER = 100
PNG_ISSUES = 12
PNG_PAIRS = 6
SOURCE_FEATURE = {"image/source": tf.io.FixedLenFeature([], tf.string)}


@dataclasses.dataclass(frozen=True)
class QualityOptions:
    """The report's settings (the --data_quality_* flags).

    near_duplicate_similarity: thumbnail correlation from which two images count as near-duplicates.
    folds: logistic regressions (folds) whose out-of-fold predictions score the labels.
    max_listed: most label issues, near-duplicate pairs and near-duplicate groups written to the report.
    max_images: larger folders are reported on a stable sample of this many images (every k-th image of each
        split's evaluation order), so that the report's memory stays within about 1 KiB an image of this.
    batch_size: images per feature-extractor call (when the report makes its own pass).
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
        if self.max_images < max(2, self.folds):
            raise ValueError(f"--data_quality_max_images={self.max_images} must be at least --data_quality_folds "
                             f"({self.folds}): each fold needs images")
        if self.max_listed < 1 or self.batch_size < 1:
            raise ValueError(f"the data-quality report's max_listed ({self.max_listed}) and batch_size "
                             f"({self.batch_size}) must be at least 1")


class Collector:
    """Keeps what the report needs of each image as feature passes hand it over (Collector.add_function).

    Arrays are allocated once for every image of the manifest (or the sample of max_images): embeddings of
    `width` floats, or fewer when all of them would pass EMBEDDING_BUDGET_MB (then the first PROJECTION_FIT_ROWS
    rows fit a PCA and every row is stored projected), THUMBNAIL_SIDE**2 bytes of thumbnail, the label, the split
    and the position in its split's evaluation order (data.evaluation_records).
    """

    thumbnail_side = THUMBNAIL_SIDE

    def __init__(self, *, manifest: dict, width: int, max_images: int):
        self.split_names = list(manifest["splits"])
        total = sum(split["num_examples"] for split in manifest["splits"].values())
        # Every stride-th position of each split: a stable sample, the same images every time.
        self.stride = max(1, -(-total // max_images))
        self.total = total
        capacity = sum(-(-split["num_examples"] // self.stride) for split in manifest["splits"].values())
        self.width = width
        self.stored_width = min(width, MAX_EMBEDDING_WIDTH,
                                max(MIN_PROJECTED_WIDTH, int(EMBEDDING_BUDGET_MB * 2**20 // (2 * capacity)) // 8 * 8))
        check_memory(capacity, self.stored_width)
        # float16: unit rows need no more precision for a linear probe, and half the memory is a wider embedding.
        self.vectors = np.zeros((capacity, self.stored_width), np.float16)
        self.thumbnails = np.empty((capacity, THUMBNAIL_SIDE**2), np.uint8)
        self.labels = np.empty(capacity, np.int32)
        self.split_ids = np.empty(capacity, np.int8)
        self.positions = np.empty(capacity, np.int32)
        self.count = 0
        self.seen = set()
        self.projection = None  # (mean, components) once fitted
        self.unprojected = []  # full-width rows before the projection is fitted

    @classmethod
    def for_model(cls, model: keras.Model, *, manifest: dict, max_images: int) -> "Collector":
        """A collector for the embeddings of the model's feature extractor (the input of its head)."""
        return cls(manifest=manifest, width=model.get_layer(features.HEAD_LAYERS[0]).input.shape[-1],
                   max_images=max_images)

    def add_function(self, split: str):
        """The `collect` of features.compute_features for one evaluation pass over `split` (with thumbnails)."""
        self.seen.add(split)
        split_id = self.split_names.index(split)

        def add(embeddings, labels, weights, thumbnails, positions):
            keep = (weights > 0) & (positions % self.stride == 0)  # padding weighs 0
            self._add(embeddings[keep], labels[keep], thumbnails[keep], positions[keep], split_id)

        return add

    def missing_splits(self) -> list:
        """The splits no pass has handed over yet."""
        return [split for split in self.split_names if split not in self.seen]

    def _add(self, embeddings, labels, thumbnails, positions, split_id) -> None:
        start, end = self.count, self.count + len(labels)
        if end > len(self.labels):
            raise AssertionError(f"more images than the manifest counts ({end} > {len(self.labels)})")
        self.thumbnails[start:end] = np.clip(thumbnails, 0, 255)
        self.labels[start:end], self.split_ids[start:end], self.positions[start:end] = labels, split_id, positions
        self.count = end
        embeddings = _unit_rows(embeddings.astype(np.float32))
        if self.stored_width == self.width:
            self.vectors[start:end] = embeddings
            return
        if self.projection is None:
            self.unprojected.append(embeddings)
            if sum(len(rows) for rows in self.unprojected) >= PROJECTION_FIT_ROWS:
                self._fit_projection()
            return
        self.vectors[start:end] = self._project(embeddings)

    def _fit_projection(self) -> None:
        rows = np.concatenate(self.unprojected)
        mean = rows.mean(axis=0)
        _, _, components = np.linalg.svd(rows - mean, full_matrices=False)
        self.projection = (mean, components[: self.stored_width].T)
        self.vectors[: len(rows)] = self._project(rows)
        self.unprojected = []

    def _project(self, rows: np.ndarray) -> np.ndarray:
        mean, components = self.projection
        projected = np.zeros((len(rows), self.stored_width), np.float32)
        projected[:, : components.shape[1]] = (rows - mean) @ components
        return _unit_rows(projected)  # unit rows again: LOGISTIC_C was chosen for unit-length embeddings

    def finish(self) -> None:
        """Projects the rows still waiting for a projection (fewer than PROJECTION_FIT_ROWS in all)."""
        if self.unprojected:
            self._fit_projection()


def check_memory(images: int, width: int) -> None:
    """Stops before any pass when the report's arrays and search index would not fit the available memory."""
    needed = images * (width * 2 + THUMBNAIL_SIDE**2 * 2 + 16 + NEIGHBOURS * 24 + HNSW_LINKS * 8)
    available = psutil.virtual_memory().available
    if needed > available / 2:
        raise ValueError(
            f"the data-quality report of {images} images needs about {needed / 2**20:.0f} MiB, more than half the "
            f"{available / 2**20:.0f} MiB available: lower --data_quality_max_images, or --nodata_quality"
        )


def _unit_rows(rows: np.ndarray) -> np.ndarray:
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def embed_splits(*, model: keras.Model, splits: data.DistributedSplits, collector: Collector, names: list,
                 feature_model: keras.Model | None = None) -> None:
    """The report's own pass: embeds the images of the named splits with the model's feature extractor.

    feature_model: one whose first output is the pooled features, already traced by phase 1's pass (the pass model
    of phase 2's cut, activations.py): its traced step is reused; default: features.split_model's.
    """
    feature_model = feature_model or features.split_model(model)[0]
    for split in names:
        collect = collector.add_function(split)
        features.compute_features(
            feature_model=feature_model, strategy=splits.strategy,
            dataset=splits.images(split, training=False, thumbnail_side=collector.thumbnail_side),
            num_batches=-(-splits.manifest["splits"][split]["num_examples"] // splits.batch_size), training=False,
            collect=collect,
        )


def make_folder_report(*, model: keras.Model, data_dir: str, manifest: dict, image_size: int,
                       options: QualityOptions) -> dict:
    """The report of a converted folder from a pass of its own over every split (python -m trainer.data_quality)."""
    collector = Collector.for_model(model, manifest=manifest, max_images=options.max_images)
    splits = data.DistributedSplits(
        strategy=tf.distribute.get_strategy(), data_dir=data_dir, manifest=manifest, image_size=image_size,
        batch_size=options.batch_size, options=data.standalone_options(),
    )
    embed_splits(model=model, splits=splits, collector=collector, names=collector.missing_splits())
    return make_report(collector=collector, data_dir=data_dir, manifest=manifest, options=options)


def normalized_thumbnails(thumbnails: np.ndarray) -> np.ndarray:
    """uint8 thumbnails as zero-centred unit float32 rows: their dot products are correlations (brightness and
    contrast do not count)."""
    rows = thumbnails.astype(np.float32)
    rows -= rows.mean(axis=1, keepdims=True)
    return _unit_rows(rows)


def distinct_thumbnails(thumbnails: np.ndarray) -> tuple:
    """(the first row of each distinct thumbnail, the distinct thumbnail of each row): equal bytes, one key."""
    keys = np.ascontiguousarray(thumbnails).view(np.dtype((np.void, thumbnails.shape[1]))).ravel()
    _, distinct, key_of_row = np.unique(keys, return_index=True, return_inverse=True)
    return distinct, key_of_row


def near_duplicate_pairs(thumbnails: np.ndarray, *, similarity: float) -> tuple:
    """Pairs (first, second, similarity) of images, first < second, whose thumbnails correlate at `similarity` or
    more, among each image's NEIGHBOURS + 1 nearest (itself among them, mostly): at most NEIGHBOURS + 1 pairs an
    image, whatever the folder holds."""
    # Identical thumbnails are joined to the first of them at similarity 1 (unless flat: no correlation), and only
    # distinct ones are searched: an index of thousands of equal vectors is slow to build and to search.
    distinct, key_of_row = distinct_thumbnails(thumbnails)
    copies = np.flatnonzero(distinct[key_of_row] != np.arange(len(thumbnails)))
    copies = copies[thumbnails[copies].min(axis=1) != thumbnails[copies].max(axis=1)]
    first, second, scores = _search(thumbnails[distinct], similarity=similarity)
    first, second = np.minimum(distinct[first], distinct[second]), np.maximum(distinct[first], distinct[second])
    originals = distinct[key_of_row[copies]]
    return (np.r_[first, originals].astype(np.int32), np.r_[second, copies].astype(np.int32),
            np.r_[scores, np.ones(len(copies), np.float32)].astype(np.float32))


def _search(thumbnails: np.ndarray, *, similarity: float) -> tuple:
    """near_duplicate_pairs among distinct thumbnails: each one's nearest, re-scored exactly."""
    count = len(thumbnails)
    empty = (np.empty(0, np.int32), np.empty(0, np.int32), np.empty(0, np.float32))
    if count < 2:
        return empty
    dimension = thumbnails.shape[1]
    if count <= EXACT_SEARCH_MAX_IMAGES:
        index = faiss.IndexFlatIP(dimension)
    else:
        index = faiss.IndexHNSWSQ(dimension, faiss.ScalarQuantizer.QT_8bit, HNSW_LINKS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        sample = np.random.default_rng(0).choice(count, min(count, 20 * 1024), replace=False)
        index.train(normalized_thumbnails(thumbnails[np.sort(sample)]))
    for start in range(0, count, SEARCH_ROWS):
        index.add(normalized_thumbnails(thumbnails[start : start + SEARCH_ROWS]))
    if count > EXACT_SEARCH_MAX_IMAGES:
        index.hnsw.efSearch = HNSW_EF_SEARCH
    neighbours = min(NEIGHBOURS + 1, count)  # + 1: an image finds itself
    found = []
    for start in range(0, count, SEARCH_ROWS):
        rows = normalized_thumbnails(thumbnails[start : start + SEARCH_ROWS])
        _, candidates = index.search(rows, neighbours)
        queries = np.repeat(np.arange(start, start + len(rows)), neighbours)
        candidates = candidates.ravel()
        valid = (candidates >= 0) & (candidates != queries)
        queries, candidates = queries[valid], candidates[valid]
        # Re-scored exactly: the HNSW index holds 8-bit vectors.
        scores = np.einsum("ij,ij->i", rows[queries - start], normalized_thumbnails(thumbnails[candidates]))
        near = scores >= similarity
        first, second = np.minimum(queries, candidates)[near], np.maximum(queries, candidates)[near]
        found.append((first.astype(np.int32), second.astype(np.int32), scores[near].astype(np.float32)))
    first, second, scores = (np.concatenate(values) for values in zip(*found))
    # A pair found from both of its images is kept once.
    _, unique = np.unique(first.astype(np.int64) * count + second, return_index=True)
    return first[unique], second[unique], scores[unique]


def find_near_duplicates(collector: Collector, *, similarity: float, max_listed: int) -> dict:
    """Near-duplicate groups and pairs (row numbers of the collector), and their counts.

    Returns:
        {"pairs": [(first, second, similarity)] at most max_listed, across splits first, then closest first;
         "groups": [rows of one group] at most max_listed, largest first, each at most GROUP_EXAMPLES rows, and
         "group_sizes" and "group_splits" ({split: images}) beside them; counts: "num_pairs",
         "num_pairs_across_splits", "num_groups", "num_images_in_groups", "largest_group", and
         "num_evaluation_images_with_a_train_duplicate".}
    """
    count, split_ids = collector.count, collector.split_ids[: collector.count]
    first, second, scores = near_duplicate_pairs(collector.thumbnails[:count], similarity=similarity)
    num_pairs, num_across = count_pairs(collector.thumbnails[:count], split_ids, first, second,
                                        num_splits=len(collector.split_names))
    across = split_ids[first] != split_ids[second]
    order = np.lexsort((second, first, -scores, ~across))[:max_listed]
    component = _groups(first, second, count)
    # A group larger than NEIGHBOURS + 1 may have every member's nearest neighbours inside it, so its edge to
    # another group can go unseen (two tight clusters of copies, alike across): one member of each such group
    # is searched against the others' and the groups whose members match are joined.
    sizes = np.bincount(component)
    _, first_members = np.unique(component, return_index=True)
    representatives = first_members[sizes > NEIGHBOURS + 1]
    if len(representatives) > 1:
        joined_first, joined_second, _ = near_duplicate_pairs(collector.thumbnails[representatives], similarity=similarity)
        component = _groups(np.r_[first, representatives[joined_first]], np.r_[second, representatives[joined_second]],
                            count)
        sizes = np.bincount(component)
    grouped = sizes[component] > 1
    train_id = collector.split_names.index("train") if "train" in collector.split_names else -1
    has_train = np.bincount(component, weights=split_ids == train_id, minlength=len(sizes)) > 0
    leaked = grouped & has_train[component] & (split_ids != train_id)
    groups = np.flatnonzero(sizes > 1)
    groups = groups[np.argsort(-sizes[groups], kind="stable")][:max_listed]
    members = [[] for _ in groups]
    where = {group: position for position, group in enumerate(groups)}
    group_splits = [dict.fromkeys(collector.split_names, 0) for _ in groups]
    for row in np.flatnonzero(np.isin(component, groups)):
        position = where[component[row]]
        group_splits[position][collector.split_names[split_ids[row]]] += 1
        if len(members[position]) < GROUP_EXAMPLES:
            members[position].append(int(row))
    return {
        "pairs": [(int(first[i]), int(second[i]), float(scores[i])) for i in order],
        "groups": members, "group_sizes": [int(sizes[group]) for group in groups],
        "group_splits": [{name: value for name, value in splits.items() if value} for splits in group_splits],
        "num_pairs": num_pairs, "num_pairs_across_splits": num_across, "num_groups": int(np.sum(sizes > 1)),
        "num_images_in_groups": int(grouped.sum()), "largest_group": int(sizes.max()) if grouped.any() else 0,
        "num_evaluation_images_with_a_train_duplicate": int(leaked.sum()),
    }


def count_pairs(thumbnails: np.ndarray, split_ids: np.ndarray, first: np.ndarray, second: np.ndarray, *,
                num_splits: int) -> tuple:
    """(pairs, pairs across splits) that near_duplicate_pairs' edges stand for: m identical (not flat) thumbnails
    are m (m - 1) / 2 pairs, an edge between two distinct thumbnails is one pair for each of their copies. Exact
    where every image's near-duplicates are among its nearest; a lower bound in groups larger than that."""
    distinct, key_of_row = distinct_thumbnails(thumbnails)
    copies = np.zeros((len(distinct), num_splits), np.int64)  # images of each distinct thumbnail in each split
    np.add.at(copies, (key_of_row, split_ids), 1)
    flat = thumbnails[distinct].min(axis=1) == thumbnails[distinct].max(axis=1)
    total = copies.sum(axis=1)
    within = np.where(flat, 0, total * (total - 1) // 2)
    within_same_split = np.where(flat, 0, (copies * (copies - 1) // 2).sum(axis=1))
    first_keys, second_keys = key_of_row[first], key_of_row[second]
    between = first_keys != second_keys  # edges of the search, not the links of copies
    first_keys, second_keys = first_keys[between], second_keys[between]
    pairs = int(within.sum() + np.sum(total[first_keys] * total[second_keys]))
    same_split = int(within_same_split.sum() + np.sum(copies[first_keys] * copies[second_keys]))
    return pairs, pairs - same_split


def _groups(first: np.ndarray, second: np.ndarray, count: int) -> np.ndarray:
    """The connected component of each of `count` images, joined by the pairs (first[i], second[i])."""
    graph = sparse.coo_matrix((np.ones(len(first), np.int8), (first, second)), shape=(count, count))
    return csgraph.connected_components(graph, directed=False)[1]


def out_of_fold_probabilities(vectors: np.ndarray, labels: np.ndarray, *, num_classes: int, folds: int,
                              seed: int) -> np.ndarray:
    """Each image's class probabilities from a logistic regression that never saw it.

    Folds stratified by label when every class has an image per fold; each fold's regression learns from at
    most MAX_FIT_ROWS images of the other folds (a seeded sample). With one BLAS thread: measured on 498
    embeddings of width 1280 (5 folds, 2 cores, TensorFlow loaded), 1.9 s with OpenBLAS's two threads, 0.17 s
    with one (the products are too small to share).
    """
    folds = min(folds, len(labels))  # a folder (or sample) of fewer images than folds: one image a fold
    if folds < 2:
        return np.eye(num_classes, dtype=np.float32)[labels]  # nothing to learn from: no label is doubted
    smallest = min(int(np.sum(labels == label)) for label in np.unique(labels))
    splitter = (model_selection.StratifiedKFold if smallest >= folds else model_selection.KFold)(
        n_splits=folds, shuffle=True, random_state=seed
    )
    rng = np.random.default_rng(seed)
    probabilities = np.zeros((len(labels), num_classes), np.float32)
    with warnings.catch_warnings(), threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        # Stopping at LOGISTIC_MAX_ITER: the ranking, not exact probabilities, is what the report needs.
        warnings.simplefilter("ignore", exceptions.ConvergenceWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        for fit_rows, scored_rows in splitter.split(np.zeros(len(labels)), labels):
            if len(fit_rows) > MAX_FIT_ROWS:
                fit_rows = np.sort(rng.choice(fit_rows, MAX_FIT_ROWS, replace=False))
            classes = np.unique(labels[fit_rows])
            if len(classes) == 1:  # nothing to tell apart: certain of the one class it saw
                probabilities[np.ix_(scored_rows, classes)] = 1.0
                continue
            classifier = linear_model.LogisticRegression(C=LOGISTIC_C, max_iter=LOGISTIC_MAX_ITER)
            classifier.fit(vectors[fit_rows].astype(np.float32), labels[fit_rows])
            # A fold without some class: its probabilities for that class stay 0, which confident learning allows.
            for start in range(0, len(scored_rows), MAX_FIT_ROWS):  # in chunks: sklearn converts them to float64
                rows = scored_rows[start : start + MAX_FIT_ROWS]
                probabilities[np.ix_(rows, classes)] = classifier.predict_proba(vectors[rows].astype(np.float32))
    return probabilities


def find_label_issues(labels: np.ndarray, probabilities: np.ndarray, *, max_listed: int) -> dict:
    """Images whose given label looks wrong (see the module docstring), as row numbers, and how many there are.

    Returns:
        {"rows": the listed rows, lowest self-confidence first (then by row); "suggested": their suggested class
         ids; "confident": whether confident learning placed each off the diagonal; "count": all issues found}.
    """
    num_classes = probabilities.shape[1]
    given_probability = probabilities[np.arange(len(labels)), labels]
    # Confident learning's per-class thresholds: the mean probability of a class over the images given it.
    thresholds = np.array([
        probabilities[labels == label, label].mean() if np.any(labels == label) else 1.0 for label in range(num_classes)
    ])
    above = probabilities >= thresholds
    # The classes this image is confidently in; its cell of the confident joint is the likeliest of them.
    joint = np.argmax(np.where(above, probabilities, -1.0), axis=1)
    confident = above.any(axis=1) & (joint != labels)
    predicted = np.argmax(probabilities, axis=1)
    issues = np.flatnonzero(confident | (predicted != labels))
    listed = issues[np.lexsort((issues, given_probability[issues]))][:max_listed]
    suggested = np.where(confident[listed], joint[listed], predicted[listed])
    return {"rows": listed, "suggested": suggested, "confident": confident[listed], "count": len(issues),
            "scores": given_probability[listed]}


def make_report(*, collector: Collector, data_dir: str, manifest: dict, options: QualityOptions) -> dict:
    """The report of what the collector holds: data_quality.json's contents.

    {"label_issues": [{"path", "split", "given", "suggested", "score", "confident"}...],
     "near_duplicates": [{"paths": [a, b], "splits": [...], "similarity"}...],
     "near_duplicate_groups": [{"size", "splits": {split: images}, "examples": [paths]}...], and counts.}
    """
    started = time.perf_counter()
    collector.finish()
    count, class_names = collector.count, manifest["classes"]
    labels = collector.labels[:count].astype(np.int64)
    probabilities = out_of_fold_probabilities(collector.vectors[:count], labels, num_classes=len(class_names),
                                              folds=options.folds, seed=options.seed)
    issues = find_label_issues(labels, probabilities, max_listed=options.max_listed)
    seconds = {"label issues": time.perf_counter() - started}
    started = time.perf_counter()
    duplicates = find_near_duplicates(collector, similarity=options.near_duplicate_similarity,
                                      max_listed=options.max_listed)
    seconds["near-duplicates"] = time.perf_counter() - started
    started = time.perf_counter()
    wanted = {*issues["rows"].tolist(), *(row for pair in duplicates["pairs"] for row in pair[:2]),
              *(row for group in duplicates["groups"] for row in group)}
    paths = read_paths(collector, data_dir=data_dir, manifest=manifest, rows=wanted)
    seconds["reading the listed paths"] = time.perf_counter() - started
    logging.info("data-quality report of %d images: %s", count,
                 ", ".join(f"{name} {value:.1f}s" for name, value in seconds.items()))
    split_of = lambda row: collector.split_names[collector.split_ids[row]]  # noqa: E731 (a one-line lookup)
    return {
        "data_dir": data_dir, "num_images": count, "num_images_in_data": collector.total, "sampled": collector.stride > 1,
        "folds": options.folds, "near_duplicate_similarity": options.near_duplicate_similarity,
        "embedding_width": collector.stored_width,
        "out_of_fold_accuracy": round(float(np.mean(np.argmax(probabilities, axis=1) == labels)), 4),
        "num_label_issues": issues["count"],
        "num_near_duplicates": duplicates["num_pairs"],
        "num_near_duplicates_across_splits": duplicates["num_pairs_across_splits"],
        "num_near_duplicate_groups": duplicates["num_groups"],
        "num_images_in_near_duplicate_groups": duplicates["num_images_in_groups"],
        "largest_near_duplicate_group": duplicates["largest_group"],
        "num_evaluation_images_with_a_train_duplicate": duplicates["num_evaluation_images_with_a_train_duplicate"],
        "label_issues": [
            {"path": paths[row], "split": split_of(row), "given": class_names[labels[row]],
             "suggested": class_names[suggested], "score": round(float(score), 4), "confident": bool(confident)}
            for row, suggested, score, confident in zip(
                issues["rows"].tolist(), issues["suggested"], issues["scores"], issues["confident"])
        ],
        "near_duplicates": [
            {"paths": [paths[first], paths[second]], "splits": [split_of(first), split_of(second)],
             "similarity": round(value, 4)}
            for first, second, value in duplicates["pairs"]
        ],
        "near_duplicate_groups": [
            {"size": size, "splits": splits, "examples": [paths[row] for row in rows]}
            for size, splits, rows in zip(duplicates["group_sizes"], duplicates["group_splits"], duplicates["groups"])
        ],
    }


def read_paths(collector: Collector, *, data_dir: str, manifest: dict, rows: set) -> dict:
    """The source paths of the given collector rows, read back from the shards (only the splits and the
    positions needed: each split's records are read in evaluation order up to its last wanted position, and only
    the wanted ones are parsed)."""
    wanted_by_split = {}
    for row in rows:
        split = collector.split_names[collector.split_ids[row]]
        wanted_by_split.setdefault(split, {})[int(collector.positions[row])] = row
    paths = {}
    for split, wanted in wanted_by_split.items():
        mask = np.zeros(max(wanted) + 1, bool)
        mask[list(wanted)] = True
        records = data.evaluation_records(data_dir, manifest, split).take(len(mask)).enumerate()
        records = records.filter(lambda position, _: tf.gather(mask, position)).map(
            lambda position, serialized: (position, tf.io.parse_single_example(serialized, SOURCE_FEATURE)["image/source"])
        )
        for position, path in records.as_numpy_iterator():
            paths[wanted[int(position)]] = path.decode("utf-8")
    return paths


def write_report(*, quality: dict, output_dir: str, data_dir: str, manifest: dict, image_size: int) -> str:
    """Writes data_quality.json and data_quality.png into output_dir; returns the one-line summary."""
    tf.io.gfile.makedirs(output_dir)
    issues, pairs = quality["label_issues"][:PNG_ISSUES], quality["near_duplicates"][:PNG_PAIRS]
    wanted = {issue["path"]: issue["split"] for issue in issues}
    wanted.update((path, split) for pair in pairs for path, split in zip(pair["paths"], pair["splits"]))
    thumbnails = read_images(data_dir=data_dir, manifest=manifest, splits_of=wanted, image_size=image_size)
    metrics.plot_quality(issues=issues, pairs=pairs, thumbnails=thumbnails,
                        path=tf.io.gfile.join(output_dir, QUALITY_PNG))
    # Last: a run resumed after a kill writes the report again unless its JSON exists, so the JSON means complete.
    schema.write_text(tf.io.gfile.join(output_dir, QUALITY_JSON), json.dumps(quality, indent=1))
    return summarize(quality=quality, path=tf.io.gfile.join(output_dir, QUALITY_JSON))


def read_images(*, data_dir: str, manifest: dict, splits_of: dict, image_size: int) -> dict:
    """The decoded images of the given source paths (source path -> its split): reads only those splits' shards,
    parses and decodes only those images (the filter runs in the tf.data graph, not per record in Python)."""
    found = {}
    for split in (split for split in manifest["splits"] if split in splits_of.values()):
        wanted = tf.constant([path for path, of in splits_of.items() if of == split])
        records = tf.data.TFRecordDataset(data.shard_paths(data_dir, manifest, split)).filter(lambda serialized: tf.reduce_any(
            tf.equal(tf.io.parse_single_example(serialized, SOURCE_FEATURE)["image/source"], wanted)))
        records = records.map(lambda serialized: (
            schema.parse_example(serialized)["image/source"],
            tf.cast(data.decode_and_resize(schema.parse_example(serialized)["image/encoded"], image_size), tf.uint8),
        ))
        for path, image in records.as_numpy_iterator():
            found.setdefault(path.decode("utf-8"), image)
    return found


def summarize(*, quality: dict, path: str) -> str:
    """The one line printed at the end of a run."""
    issues, pairs = quality["label_issues"], quality["near_duplicates"]
    top_issue = f" (first: {issues[0]['path']} looks like {issues[0]['suggested']!r})" if issues else ""
    top_pair = f" (first: {pairs[0]['paths'][0]} ~ {pairs[0]['paths'][1]})" if pairs else ""
    sample = f" (a sample of the {quality['num_images_in_data']})" if quality.get("sampled") else ""
    head = f"data quality of {quality['num_images']} images{sample}: {quality['num_label_issues']} likely label errors"
    if not quality["num_near_duplicates"]:
        return f"{head}{top_issue}, no near-duplicates; see {path}"
    groups = quality.get("num_near_duplicate_groups")
    grouped = (f"{quality['num_images_in_near_duplicate_groups']} images in {groups} near-duplicate groups (largest "
               f"{quality['largest_near_duplicate_group']}), " if groups is not None else "")
    leaked = quality.get("num_evaluation_images_with_a_train_duplicate")
    leaks = f", {leaked} validation/test images with a near-duplicate in train" if leaked is not None else ""
    return (
        f"{head}{top_issue}, {grouped}{quality['num_near_duplicates']} near-duplicate pairs, "
        f"{quality['num_near_duplicates_across_splits']} across splits{top_pair}{leaks}; see {path}"
    )
