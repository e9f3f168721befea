"""tfrecords.writing.progress: a tqdm bar on a terminal, log lines with rate and ETA elsewhere, results in order."""

import io
import logging
import re
import sys

import pytest

from tfrecords.writing import progress

ITEMS = [1, 2, 3]
TOTAL = sum(ITEMS)
LOG_LINE = re.compile(r"^converting: (\d+) of 6 images, \d+ images/s, ETA (\d+|inf) s$")


class _FakeTerminal(io.StringIO):
    """A stderr that says it is a terminal, so map_items shows a bar."""

    def isatty(self) -> bool:
        return True


def _double(item: int) -> int:
    # Module level: the worker processes receive it by name.
    progress.report(item)
    return item * 2


@pytest.mark.parametrize("num_workers", [1, 2])
def test_terminal_shows_a_bar_with_rate_and_eta(monkeypatch, num_workers):
    terminal = _FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    results = progress.map_items(
        _double, ITEMS, num_workers=num_workers, description="converting", unit="images", total=TOTAL
    )
    assert results == [2, 4, 6]
    final = terminal.getvalue().split("\r")[-1]
    assert final.startswith("converting: 100%")
    # tqdm's [elapsed<remaining (the ETA), rate] block.
    assert re.search(r"6/6 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+ images/s\]", final), final


@pytest.mark.parametrize("num_workers", [1, 2])
def test_log_lines_with_rate_and_eta_when_not_a_terminal(monkeypatch, caplog, num_workers):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setattr(progress, "LOG_EVERY_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="absl"):
        results = progress.map_items(
            _double, ITEMS, num_workers=num_workers, description="converting", unit="images", total=TOTAL
        )
    assert results == [2, 4, 6]
    assert "%|" not in stream.getvalue()  # no bar
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("converting")]
    assert lines and all(LOG_LINE.match(line) for line in lines), lines
    # The last line, written when the map ends, counts every unit reported by the workers.
    assert LOG_LINE.match(lines[-1]).groups() == ("6", "0")
    if num_workers == 1:
        # In this process every report() updates the display, so the partial counts are logged too.
        assert [int(LOG_LINE.match(line).group(1)) for line in lines] == [1, 3, 6, 6]


def test_log_lines_wait_for_the_interval(monkeypatch, caplog):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.setattr(progress, "LOG_EVERY_SECONDS", 3600.0)
    with caplog.at_level(logging.INFO, logger="absl"):
        progress.map_items(_double, ITEMS, num_workers=1, description="converting", unit="images", total=TOTAL)
    # Only the closing line: the interval never passed.
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1 and LOG_LINE.match(lines[0]).group(1) == "6", lines


def test_report_outside_a_map_is_ignored():
    progress.report(5)  # e.g. shards.write_shard called directly, or on a Beam worker
