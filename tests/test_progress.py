"""Progress with ETA: periodic plain lines in log files (no carriage returns), a tqdm bar on a terminal."""

from __future__ import annotations

import io
import re

import pytest

from ibot import progress as progress_module
from ibot.progress import Progress, format_duration, progress

LINE = re.compile(r"^\[(?P<desc>[^\]]+)\] (?P<done>\d+)/(?P<total>\d+) \((?P<pct>\d+)%\) (?P<elapsed>\S+) elapsed, "
                  r"(?P<rate>[\d.]+) it/s, (?:eta (?P<eta>\S+)|done)$")


class Clock:
    """A fake ``time.monotonic``: each step of the loop advances it explicitly."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(progress_module.time, "monotonic", fake)
    return fake


def test_log_file_gets_interval_lines_with_eta_and_no_carriage_return(clock) -> None:
    stream = io.StringIO()
    with Progress(20, "linear epoch 1/3", interval_s=5.0, stream=stream, enabled=True) as bar:
        for _ in range(20):
            clock.now += 1.0  # one step per second
            bar.update()
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    # at most one line per 5 s (steps 5, 10, 15) and the last one at the end
    assert [int(m["done"]) for m in parsed] == [5, 10, 15, 20]
    assert [m["eta"] for m in parsed] == ["15s", "10s", "5s", None] and lines[-1].endswith("done")
    assert parsed[0]["desc"] == "linear epoch 1/3" and parsed[0]["pct"] == "25" and parsed[0]["rate"] == "1.00"


def test_short_loop_prints_one_final_line(clock) -> None:
    stream = io.StringIO()
    for _ in progress(range(7), desc="knn features", interval_s=30.0, stream=stream):
        clock.now += 0.5
    assert stream.getvalue() == "[knn features] 7/7 (100%) 4s elapsed, 2.00 it/s, done\n"


def test_loop_left_early_reports_where_it_stopped(clock) -> None:
    stream = io.StringIO()
    batches = progress(iter(range(10)), desc="finetune epoch 1/2", total=10, interval_s=600.0, stream=stream)
    for index in batches:
        if index == 2:
            break  # as train_one_epoch: the batch past the last update is fetched, not trained on
        clock.now += 60.0
    batches.close()
    assert stream.getvalue() == "[finetune epoch 1/2] 2/10 (20%) 2m00s elapsed, 0.02 it/s, eta 8m00s\n"


def test_unknown_length_and_other_ranks(clock, monkeypatch) -> None:
    stream = io.StringIO()
    for _ in progress((i for i in range(3)), desc="val", stream=stream):
        clock.now += 1.0
    assert stream.getvalue() == "[val] 3 it 3s elapsed, 1.00 it/s\n"
    monkeypatch.setattr(progress_module, "is_main", lambda: False)
    quiet = io.StringIO()
    assert list(progress(range(3), desc="val", stream=quiet)) == [0, 1, 2] and quiet.getvalue() == ""


def test_terminal_gets_a_bar() -> None:
    terminal = Terminal()
    assert list(progress(range(5), desc="linear val features", stream=terminal)) == list(range(5))
    text = terminal.getvalue()
    assert "\r" in text and "linear val features:" in text and "/5 [" in text  # tqdm's redrawn bar
    assert not LINE.search(text)


def test_durations() -> None:
    assert [format_duration(s) for s in (0, 44.6, 123, 3599, 3720, 90061)] == \
        ["0s", "45s", "2m03s", "59m59s", "1h02m", "25h01m"]


def test_the_stages_use_this_helper() -> None:
    from downstream.engine import setup
    assert setup.progress is progress
