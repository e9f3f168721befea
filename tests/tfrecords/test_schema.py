"""Round trip of the TFRecord schema: make_example -> shards -> tf.data -> parse_example."""

import io

from PIL import Image
import pytest
import tensorflow as tf

from tfrecords import schema


def _jpeg_bytes(width: int, height: int, value: int) -> bytes:
    output = io.BytesIO()
    Image.new("RGB", (width, height), (value, 255 - value, 128)).save(output, format="JPEG")
    return output.getvalue()


def _make_records(num_examples: int) -> list:
    """Returns (serialized example, expected fields) pairs."""
    records = []
    for index in range(num_examples):
        class_name = ("cats", "dogs", "birds")[index % 3]
        fields = {
            "label": index % 3,
            "class_name": class_name,
            "source": f"{class_name}/{index:03d}.jpg",
            "height": 32 + index,
            "width": 40 + index,
        }
        example = schema.make_example(
            encoded=_jpeg_bytes(fields["width"], fields["height"], index * 10),
            height=fields["height"],
            width=fields["width"],
            label=fields["label"],
            class_name=class_name,
            source=fields["source"],
        )
        records.append((example.SerializeToString(), fields))
    return records


def _as_tuple(parsed: dict) -> tuple:
    return (
        int(parsed["image/class/label"]),
        parsed["image/class/text"].numpy().decode(),
        parsed["image/source"].numpy().decode(),
        int(parsed["image/height"]),
        int(parsed["image/width"]),
    )


def _expected_tuple(fields: dict) -> tuple:
    return (fields["label"], fields["class_name"], fields["source"], fields["height"], fields["width"])


def test_shard_name_follows_model_garden_pattern():
    assert schema.shard_name("train", 3, 12) == "train-00003-of-00012.tfrecord"


def test_parse_example_eagerly():
    serialized, fields = _make_records(1)[0]
    parsed = schema.parse_example(tf.constant(serialized))
    assert _as_tuple(parsed) == _expected_tuple(fields)
    assert parsed["image/format"].numpy() == b"jpeg"
    image = tf.io.decode_jpeg(parsed["image/encoded"], channels=3)
    assert image.shape == (fields["height"], fields["width"], 3)


@pytest.mark.parametrize("num_shards", [1, 3])
def test_round_trip_through_shards_and_tf_data(tmp_path, num_shards):
    records = _make_records(10)
    paths = [str(tmp_path / schema.shard_name("train", index, num_shards)) for index in range(num_shards)]
    writers = [tf.io.TFRecordWriter(path) for path in paths]
    for index, (serialized, _) in enumerate(records):
        writers[index % num_shards].write(serialized)
    for writer in writers:
        writer.close()

    # parse_example must work inside tf.data (graph mode), not only eagerly.
    dataset = tf.data.TFRecordDataset(paths).map(
        schema.parse_example, num_parallel_calls=tf.data.AUTOTUNE
    )
    read_back = []
    for parsed in dataset:
        image = tf.io.decode_jpeg(parsed["image/encoded"], channels=3)
        assert image.shape[:2] == (int(parsed["image/height"]), int(parsed["image/width"]))
        read_back.append(_as_tuple(parsed))
    assert sorted(read_back) == sorted(_expected_tuple(fields) for _, fields in records)
