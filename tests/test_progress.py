"""Progress of long loops: the listener hears percent done, rate and ETA, and the end."""

from __future__ import annotations

import pytest

from embedder import progress
from embedder.progress import Progress, listening


def test_the_listener_hears_how_far_how_fast_and_the_end(monkeypatch: pytest.MonkeyPatch) -> None:
    heard: list[tuple[float, str]] = []
    values: list[tuple[int, dict[str, float]]] = []

    def listener(pct: float, line: str, step: int, vals: dict[str, float]) -> None:
        heard.append((pct, line))
        values.append((step, vals))

    monkeypatch.setattr(progress, "NOTIFY_EVERY_S", 0.0)
    with listening(listener):
        bar = Progress("finetune", 4, unit="step", initial=1)
        for i in range(3):
            bar.update(1, train_loss=2.0 - i, note="text is shown, not charted")
        bar.close()
    percents = [pct for pct, _ in heard]
    assert percents[0] == 25.0 and percents[-1] == 100.0
    assert percents == sorted(percents)
    assert heard[1][1].startswith("finetune: 2/4 steps, ") and "step/s, ETA" in heard[1][1]
    # The bar's numbers, by step, for a live chart.
    assert values[:3] == [(1, {}), (2, {"train_loss": 2.0}), (3, {"train_loss": 1.0})]
    # Outside a listening block, or with the bar off, nobody is told.
    Progress("embed", 3, unit="item").update(3)
    with listening(listener):
        Progress("embed", 3, unit="item", enabled=False).update(3)
    assert percents == [pct for pct, _ in heard]


def test_updates_are_throttled(monkeypatch: pytest.MonkeyPatch) -> None:
    heard: list[float] = []
    monkeypatch.setattr(progress, "NOTIFY_EVERY_S", 3600.0)
    with listening(lambda pct, line, step, values: heard.append(pct)):
        bar = Progress("pretrain", 1000, unit="step")
        for _ in range(1000):
            bar.update(1)
        bar.close()
    assert heard == [0.0, 100.0], "the start and the end, not a call per step"
