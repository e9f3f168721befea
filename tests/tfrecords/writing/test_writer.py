"""tfrecords/writing/writer.py: the output folder it may write, --overwrite's replacement, the manifest's contents."""

import json

import pytest

from tfrecords import schema
from tfrecords.writing import writer


def test_a_foreign_non_empty_folder_or_a_file_is_refused_untouched(tmp_path):
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"is not empty \('notes.txt'\) and was not written by tfrecords.build"):
        writer.check_output_dir(output_dir=str(tmp_path / "theirs"), overwrite=True, input_dir=None)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        writer.check_output_dir(output_dir=str(tmp_path / "file"), overwrite=False, input_dir=None)
    assert (tmp_path / "theirs" / "notes.txt").read_text() == "mine"


def test_output_inside_input_and_input_inside_output_are_refused(tmp_path):
    with pytest.raises(ValueError, match="is inside --input_dir"):
        writer.check_output_dir(output_dir=str(tmp_path / "images" / "out"), overwrite=False, input_dir=str(tmp_path / "images"))
    with pytest.raises(ValueError, match="--input_dir .* is inside --output_dir"):
        writer.check_output_dir(output_dir=str(tmp_path), overwrite=False, input_dir=str(tmp_path / "images"))


def test_a_claimed_folder_is_owned_and_a_finished_one_needs_overwrite(tmp_path):
    output = str(tmp_path / "out")
    writer.check_output_dir(output_dir=output, overwrite=False, input_dir=None)  # missing: fine
    writer.claim_output_dir(output)
    assert writer.is_owned(output)
    writer.check_output_dir(output_dir=output, overwrite=False, input_dir=None)  # ours, unfinished: resumable
    schema.write_manifest(output, {"format_version": writer.FORMAT_VERSION, "classes": []})
    with pytest.raises(ValueError, match="already holds a conversion .*pass --overwrite"):
        writer.check_output_dir(output_dir=output, overwrite=False, input_dir=None)
    writer.check_output_dir(output_dir=output, overwrite=True, input_dir=None)


def test_overwrite_writes_into_the_replacement_folder_and_keeps_the_old_conversion(tmp_path):
    output = tmp_path / "out"
    writer.claim_output_dir(str(output))
    (output / "train-00000-of-00001.tfrecord").write_bytes(b"old shard")
    schema.write_manifest(str(output), {"format_version": writer.FORMAT_VERSION})
    write_dir = writer.prepare_output_dir(output_dir=str(output), planned_files=["train-00000-of-00002.tfrecord"])
    assert write_dir == str(output / writer.REPLACEMENT_FOLDER)
    assert (output / "train-00000-of-00001.tfrecord").read_bytes() == b"old shard"


def test_a_resumed_folder_keeps_only_planned_shards_and_never_a_foreign_file(tmp_path):
    output = tmp_path / "out"
    writer.claim_output_dir(str(output))
    for name in ("train-00000-of-00002.tfrecord", "train-00000-of-00003.tfrecord", "test-00000-of-00001.tfrecord.incomplete"):
        (output / name).write_bytes(b"x")
    (output / "README.md").write_text("a user's file")
    assert writer.prepare_output_dir(output_dir=str(output), planned_files=["train-00000-of-00002.tfrecord"]) == str(output)
    assert sorted(path.name for path in output.iterdir()) == [writer.OWNER_FILE, "README.md", "train-00000-of-00002.tfrecord"]


def test_the_manifest_keeps_non_empty_splits_in_order_and_sorts_skipped_files():
    manifest = writer.make_manifest(
        source={"input_dir": "/images", "layout": "class_folders"}, classes=["cat", "dog"],
        splits={"test": {"num_examples": 1}, "train": {"num_examples": 4}, "validation": {}},
        skipped=[{"path": "dog/b.jpg", "reason": "r"}, {"path": "cat/a.jpg", "reason": "r"}], label_conflicts=[],
    )
    assert list(manifest["splits"]) == ["train", "test"]
    assert [entry["path"] for entry in manifest["skipped"]] == ["cat/a.jpg", "dog/b.jpg"]
    assert manifest["format_version"] == writer.FORMAT_VERSION and manifest["classes"] == ["cat", "dog"]
    json.dumps(manifest)  # JSON-able
