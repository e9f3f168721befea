"""Re-reads every shard of a conversion and checks it against manifest.json.

    python -m tfrecords.verify --data_dir=/tmp/demo_tfrecords

For every shard listed in the manifest: the file exists, its sha256 and size match, it holds the
recorded number of records, every record parses with the schema, its JPEG decodes to the recorded
height and width, and its label matches its class name. Prints one summary line; exit code 0 when
everything matches, 1 otherwise (each problem is printed on its own line first), 2 for a bad flag.
The work is tfrecords/writing/verification.py's; this module reads the flags.
"""

import sys

from absl import app
from absl import flags

from tfrecords import cli
from tfrecords.writing import verification

flags.DEFINE_string("data_dir", None, "Output folder of `python -m tfrecords.build`, local or gs://.")
flags.mark_flag_as_required("data_dir")
FLAGS = flags.FLAGS


def main(argv: list) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        problems, num_shards, num_examples = verification.verify(data_dir=FLAGS.data_dir)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"problem: {problem}")
    status = "OK" if not problems else f"FAILED, {len(problems)} problems"
    print(f"verified {num_shards} shards, {num_examples} examples in {FLAGS.data_dir}: {status}")
    return 1 if problems else 0


def run() -> None:
    """Entry point of `python -m tfrecords.verify`."""
    app.run(cli.frozen_heap(main), flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
