"""tfrecords/sources/tfds_source.py: --tfds_splits parsing, default splits, and a TFDS source reading itself."""

import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from tfrecords.sources import tfds_source  # noqa: E402 (after the importorskip)


def test_parse_splits_maps_our_splits_to_tfds_splits():
    assert tfds_source.parse_splits("train=train[:80%], validation=train[80%:]") == {
        "train": "train[:80%]", "validation": "train[80%:]"}
    assert tfds_source.parse_splits("") == {}
    with pytest.raises(ValueError, match="expected <split>=<TFDS split>"):
        tfds_source.parse_splits("holdout=test")


def test_a_dataset_with_only_train_is_cut_by_the_fractions():
    splits = tfds_source._default_splits(available=["train"], validation_fraction=0.2, test_fraction=0.1)
    assert splits == {"train": "train[30%:]", "validation": "train[10%:30%]", "test": "train[:10%]"}
    assert tfds_source._default_splits(available=["train", "test"], validation_fraction=0.2, test_fraction=0.1) == {
        "train": "train", "test": "test"}


def test_plan_gives_tasks_whose_source_reads_the_examples(tmp_path):
    with tfds.testing.mock_data(num_examples=4):
        classes, tasks, source = tfds_source.plan_tfds(
            name="tf_flowers", data_dir=str(tmp_path), splits="train=train", num_shards=2, validation_fraction=0.2,
            test_fraction=0.1, max_side=None, jpeg_quality=90,
        )
        assert source["layout"] == "tfds" and classes == ["dandelion", "daisy", "tulips", "sunflowers", "roses"]
        assert [task.file for task in tasks] == ["train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord"]
        assert len({task.fingerprint for task in tasks}) == 2 and tasks[0].images == ()
        examples = list(tasks[0].source.read())
    assert examples and all(isinstance(data, bytes) and image.class_name in classes for image, data in examples)
