"""tfrecords/writing/plan.py: hashing, deduplication, shard assignment, and a shard's file source."""

import tensorflow as tf

from tfrecords.writing import plan
from tfrecords.writing import shards


def source_file(tmp_path, relative_path: str, content: bytes, label: int = 0, split: str = "train") -> plan.SourceFile:
    path = tmp_path / relative_path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    class_name = relative_path.split("/")[0]
    return plan.SourceFile(path=str(path), relative_path=relative_path, class_name=class_name, label=label, split=split)


def test_count_shards_is_at_least_one_and_at_most_one_per_file():
    assert plan.count_shards(num_files=10, total_bytes=0, num_shards=4, target_shard_mb=100) == 4
    assert plan.count_shards(num_files=3, total_bytes=0, num_shards=8, target_shard_mb=100) == 3
    assert plan.count_shards(num_files=100, total_bytes=250 * 2**20, num_shards=0, target_shard_mb=100) == 3
    assert plan.count_shards(num_files=5, total_bytes=10, num_shards=0, target_shard_mb=100) == 1


def test_order_does_not_depend_on_the_input_order(tmp_path):
    files = [source_file(tmp_path, f"cat/{index}.jpg", bytes([index])) for index in range(20)]
    ordered = plan.order_files(files=files, seed=1)
    assert plan.order_files(files=files[::-1], seed=1) == ordered
    assert sorted(ordered, key=lambda f: f.relative_path) == sorted(files, key=lambda f: f.relative_path)
    assert plan.order_files(files=files, seed=2) != ordered


def test_duplicates_are_skipped_and_cross_class_copies_are_label_conflicts(tmp_path):
    files = [
        source_file(tmp_path, "cat/a.jpg", b"same bytes", label=0),
        source_file(tmp_path, "cat/b.jpg", b"same bytes", label=0),
        source_file(tmp_path, "dog/c.jpg", b"same bytes", label=1),
        source_file(tmp_path, "dog/d.jpg", b"other bytes", label=1),
    ]
    files.append(plan.SourceFile(path=str(tmp_path / "dog/gone.jpg"), relative_path="dog/gone.jpg",
                                   class_name="dog", label=1, split="train"))
    result = plan.make_plan(files=files, classes=["cat", "dog"], num_shards=1, target_shard_mb=100, seed=0,
                            max_side=None, jpeg_quality=90, num_workers=1)
    reasons = {entry["path"]: entry["reason"] for entry in result.skipped}
    assert reasons["cat/b.jpg"] == "duplicate of cat/a.jpg" and reasons["dog/c.jpg"] == "duplicate of cat/a.jpg"
    assert reasons["dog/gone.jpg"].startswith("cannot read file:")
    assert result.label_conflicts == [{"paths": ["cat/a.jpg", "dog/c.jpg"], "classes": ["cat", "dog"]}]
    (task,) = result.tasks
    assert sorted(image.relative_path for image in task.images) == ["cat/a.jpg", "dog/d.jpg"]
    assert isinstance(task.source, plan.FileSource) and task.file == "train-00000-of-00001.tfrecord"


def test_the_fingerprint_changes_with_what_makes_the_shard(tmp_path):
    files = [source_file(tmp_path, f"cat/{index}.jpg", bytes([index]) * 10) for index in range(4)]

    def fingerprint(**overrides):
        settings = dict(files=files, classes=["cat"], num_shards=1, target_shard_mb=100, seed=0, max_side=None,
                        jpeg_quality=90, num_workers=1)
        return plan.make_plan(**{**settings, **overrides}).tasks[0].fingerprint

    assert fingerprint() == fingerprint()
    assert len({fingerprint(), fingerprint(max_side=64), fingerprint(jpeg_quality=80), fingerprint(seed=1)}) == 4


def test_a_file_source_reads_its_files_in_order_and_reports_a_vanished_one(tmp_path):
    first = source_file(tmp_path, "cat/a.jpg", b"first")
    gone = plan.SourceFile(path=str(tmp_path / "cat/gone.jpg"), relative_path="cat/gone.jpg", class_name="cat",
                             label=0, split="train")
    images = tuple(shards.SourceImage(path=f.path, relative_path=f.relative_path, class_name=f.class_name, label=0)
                   for f in (first, gone))
    (read_first, data), (read_gone, error) = list(plan.FileSource(images).read())
    assert (read_first.relative_path, data) == ("cat/a.jpg", b"first")
    assert read_gone.relative_path == "cat/gone.jpg" and isinstance(error, tf.errors.OpError)


def test_each_file_goes_to_the_shard_of_its_stable_hash_whatever_the_input_order(tmp_path):
    files = [source_file(tmp_path, f"cat/{index:02d}.jpg", bytes([index]) * 3) for index in range(40)]

    def make(files):
        return plan.make_plan(files=files, classes=["cat"], num_shards=4, target_shard_mb=100, seed=3,
                              max_side=None, jpeg_quality=90, num_workers=1)

    tasks = make(files).tasks
    assert tasks == make(files[::-1]).tasks
    assert [task.file for task in tasks] == [f"train-{index:05d}-of-00004.tfrecord" for index in range(4)]
    for index, task in enumerate(tasks):
        assert {image.relative_path for image in task.images} == {
            f.relative_path for f in files if plan.shard_of(seed=3, relative_path=f.relative_path, num_shards=4) == index
        }
    assert sum(len(task.images) for task in tasks) == 40 and all(task.images for task in tasks)


def test_a_shard_no_file_hashes_into_still_gets_its_task(tmp_path):
    # 3 files in 3 shards: with this seed two files share a shard and one shard gets none.
    files = [source_file(tmp_path, f"cat/{index}.jpg", bytes([index])) for index in range(3)]
    shard_of = [plan.shard_of(seed=0, relative_path=f.relative_path, num_shards=3) for f in files]
    assert len(set(shard_of)) < 3
    result = plan.make_plan(files=files, classes=["cat"], num_shards=3, target_shard_mb=100, seed=0,
                            max_side=None, jpeg_quality=90, num_workers=1)
    assert [task.file for task in result.tasks] == [f"train-{index:05d}-of-00003.tfrecord" for index in range(3)]
    assert sorted(len(task.images) for task in result.tasks)[0] == 0
    assert sum(len(task.images) for task in result.tasks) == 3
