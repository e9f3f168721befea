"""What the entry points share: a malformed flag is one `error: ...` line on stderr and exit code 2.

absl parses flags itself unless told otherwise, and a value it cannot read (`--batch_size=abc`,
`--export_tflite=float,int4`) then ends the program with `FATAL Flags parsing error: ...`, a hint line and exit
code 1. Every other bad input of these programs is one `error:` line and exit code 2 (docs/guarantees.md, "What we
guarantee"), so each entry point's run() passes this parser to app.run.
"""

import sys

from absl import flags

USAGE_EXIT_CODE = 2


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flags_parser: parses argv into the flags; on a bad flag prints `error: ...` and exits 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(USAGE_EXIT_CODE)
