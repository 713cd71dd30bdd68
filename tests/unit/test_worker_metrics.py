"""Reading the workers' metric files while a worker starts: prometheus_client creates a
worker's file empty and sizes it a moment later; a scrape or the supervisor's readiness check
in that moment must not fail (before, the supervisor died of the struct.error)."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key

from dispatcher.process.metrics import MULTIPROC_ENV, live_gauge_sum, render_metrics


def _ready_file(directory: Path, pid: int, value: float) -> None:
    """A worker's ``dispatcher_ready`` livesum gauge, as prometheus_client writes it."""
    values = MmapedDict(str(directory / f"gauge_livesum_{pid}.db"))
    key = mmap_key("dispatcher_ready", "dispatcher_ready", [], [], "Workers consuming.")
    values.write_value(key, value, 0.0)
    values.close()


def test_a_file_still_being_created_is_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    _ready_file(tmp_path, 101, 1.0)
    _ready_file(tmp_path, 102, 1.0)
    (tmp_path / "gauge_livesum_103.db").touch()  # a third worker, starting
    (tmp_path / "counter_103.db").touch()
    assert live_gauge_sum("dispatcher_ready") == 2.0
    text = render_metrics(None).decode()
    assert "dispatcher_ready 2.0" in text


def test_without_the_directory_there_is_nothing_to_sum(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    assert live_gauge_sum("dispatcher_ready") == 0.0
