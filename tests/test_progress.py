"""Progress of long loops: the listener hears percent done, rate and ETA, and the end."""

from __future__ import annotations

import pytest

from embedder import progress
from embedder.progress import Progress, listening


def test_the_listener_hears_how_far_how_fast_and_the_end(monkeypatch: pytest.MonkeyPatch) -> None:
    heard: list[tuple[float, str]] = []
    monkeypatch.setattr(progress, "NOTIFY_EVERY_S", 0.0)
    with listening(lambda pct, line: heard.append((pct, line))):
        bar = Progress("finetune", 4, unit="step", initial=1)
        for _ in range(3):
            bar.update(1, loss="1.0")
        bar.close()
    percents = [pct for pct, _ in heard]
    assert percents[0] == 25.0 and percents[-1] == 100.0
    assert percents == sorted(percents)
    assert heard[1][1].startswith("finetune: 2/4 steps, ") and "step/s, ETA" in heard[1][1]
    # Outside a listening block, or with the bar off, nobody is told.
    Progress("embed", 3, unit="item").update(3)
    with listening(lambda pct, line: heard.append((pct, line))):
        Progress("embed", 3, unit="item", enabled=False).update(3)
    assert percents == [pct for pct, _ in heard]


def test_updates_are_throttled(monkeypatch: pytest.MonkeyPatch) -> None:
    heard: list[float] = []
    monkeypatch.setattr(progress, "NOTIFY_EVERY_S", 3600.0)
    with listening(lambda pct, line: heard.append(pct)):
        bar = Progress("pretrain", 1000, unit="step")
        for _ in range(1000):
            bar.update(1)
        bar.close()
    assert heard == [0.0, 100.0], "the start and the end, not a call per step"
