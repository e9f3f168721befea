"""tfrecords/cli.py: what the entry points share."""

import gc

from tfrecords import cli


def collected_ids() -> set:
    """The ids of the objects the garbage collector walks (gc.get_objects leaves the frozen ones out)."""
    return {id(each) for each in gc.get_objects()}


def test_frozen_heap_freezes_at_start_and_at_return_and_passes_main_through():
    before, made, seen = [[]], [], []

    def main(argv):
        made.append([])  # an object made while main runs: frozen when main returns
        seen.append((argv, id(before[0]) in collected_ids(), id(made[0]) in collected_ids()))
        return 3

    gc.unfreeze()
    try:
        assert id(before[0]) in collected_ids()
        assert cli.frozen_heap(main)(["program", "--flag"]) == 3
        assert seen == [(["program", "--flag"], False, True)]  # `before` frozen at the start, `made` not yet
        assert id(made[0]) not in collected_ids()
    finally:
        gc.unfreeze()  # this test process goes on collecting as before
