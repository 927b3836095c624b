"""Steps: timed on the host monotonic clock, nested, failures kept with their error, logged per board."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from labbench import steps


def test_steps_are_timed_nested_and_keep_their_error():
    mark = steps.count()
    with steps.step("esp32", "install", "digits.tflite"):
        time.sleep(0.02)
        with pytest.raises(ValueError), steps.step("esp32", "identify"):
            raise ValueError("garbled banner")
    install, identify = steps.since(mark)
    assert (install.name, install.detail, install.depth, install.status) == (
        "install",
        "digits.tflite",
        0,
        "ok",
    )
    assert (
        install.duration_s >= 0.02 and install.start_s <= identify.start_s <= identify.end_s <= install.end_s
    )
    assert (identify.depth, identify.status, identify.error) == (1, "error", "ValueError: garbled banner")
    assert str(identify).startswith("esp32: identify: error in ")


def test_depth_is_per_thread():
    mark = steps.count()

    def other() -> None:
        with steps.step("b", "other"):
            pass

    with steps.step("a", "outer"):
        t = threading.Thread(target=other)
        t.start()
        t.join()
    depths = {s.board: s.depth for s in steps.since(mark)}
    assert depths == {"a": 0, "b": 0}


def test_old_steps_are_dropped_beyond_keep_and_marks_stay_valid(monkeypatch):
    monkeypatch.setattr(steps, "KEEP", 5)
    mark = steps.count()
    for i in range(8):
        with steps.step("x", f"s{i}"):
            pass
    assert steps.count() == mark + 8
    assert [s.name for s in steps.since(mark)] == [f"s{i}" for i in range(3, 8)]
    assert [s.name for s in steps.since(mark + 6)] == ["s6", "s7"]


def test_board_log_files_hold_each_boards_steps(tmp_path):
    handler = steps.BoardLogFiles(tmp_path)
    steps.log.addHandler(handler)
    steps.log.setLevel(logging.INFO)
    try:
        with steps.step("esp32", "flash with esptool", "app.bin"):
            pass
        with pytest.raises(OSError), steps.step("rpi4", "connect"):
            raise OSError("refused")
    finally:
        steps.log.removeHandler(handler)
        handler.close()
    esp32 = (tmp_path / "esp32-steps.log").read_text().splitlines()
    assert next(line.split(" ", 2)[1:] for line in esp32) == ["INFO", "esp32: flash with esptool app.bin"]
    assert "esp32: flash with esptool app.bin: ok in " in esp32[1]
    assert "WARNING rpi4: connect: error in " in (tmp_path / "rpi4-steps.log").read_text()
