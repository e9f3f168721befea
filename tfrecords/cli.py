"""What the entry points share: a malformed flag is one `error: ...` line on stderr and exit code 2, and a garbage
collector that leaves alone what exists when main starts and when it returns.

absl parses flags itself unless told otherwise, and a value it cannot read (`--batch_size=abc`,
`--export_tflite=float,int4`) then ends the program with `FATAL Flags parsing error: ...`, a hint line and exit
code 1. Every other bad input of these programs is one `error:` line and exit code 2 (docs/guarantees.md, "What we
guarantee"), so each entry point's run() passes this parser to app.run.
"""

import functools
import gc
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


def frozen_heap(main):
    """main(argv) with gc.freeze() when it starts and when it returns: each entry point runs app.run(frozen_heap(main)).

    gc.freeze() moves every object the collector tracks to a generation it never walks again. When main starts
    those are what the imports made (TensorFlow and Keras: about half a million objects, alive until the process
    ends), which every full collection would walk again: 11 full collections took 2.0 s of a flowers_small training
    run, 15 took 1.4 s with the freeze. When main returns, the interpreter's last collection at exit has nothing
    left to walk: exiting after importing TensorFlow took 1.1 s, 0.1 s with it. A frozen object is freed by its
    reference count only, never by the collector: those of the start live as long as the process anyway. A
    process that calls main more than once (tests/entry_point_runs.py) unfreezes and collects in between.
    """

    @functools.wraps(main)
    def with_frozen_heap(argv):
        gc.freeze()
        try:
            return main(argv)
        finally:
            gc.freeze()

    return with_frozen_heap
