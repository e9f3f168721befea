"""tfrecords/writing/verification.py: re-reading a conversion against its manifest."""

import json
import shutil

import pytest

from tfrecords import schema
from tfrecords.writing import verification


@pytest.fixture
def converted(demo_data_dir, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(demo_data_dir, copy)
    return copy


def test_a_sound_conversion_has_no_problem(converted):
    manifest = schema.read_manifest(str(converted))
    problems, num_shards, num_examples = verification.verify(data_dir=str(converted))
    assert problems == []
    assert num_shards == sum(len(split["shards"]) for split in manifest["splits"].values())
    assert num_examples == sum(split["num_examples"] for split in manifest["splits"].values())


def test_a_missing_shard_a_flipped_byte_and_a_wrong_count_are_each_found(converted):
    manifest = schema.read_manifest(str(converted))
    train, validation = manifest["splits"]["train"]["shards"], manifest["splits"]["validation"]["shards"]
    (converted / train[0]["file"]).unlink()
    data = bytearray((converted / train[1]["file"]).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (converted / train[1]["file"]).write_bytes(bytes(data))
    validation[0]["num_examples"] += 1
    (converted / schema.MANIFEST_FILE).write_text(json.dumps(manifest))
    problems, _, _ = verification.verify(data_dir=str(converted))
    assert f"{train[0]['file']}: missing" in problems
    assert f"{train[1]['file']}: sha256 differs from the manifest" in problems
    assert any(problem.startswith(f"{validation[0]['file']}: ") and "manifest says" in problem for problem in problems)


def test_a_folder_without_a_manifest_is_refused(tmp_path):
    with pytest.raises(ValueError, match="has no manifest.json"):
        verification.verify(data_dir=str(tmp_path))
