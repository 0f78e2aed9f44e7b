"""InfoNCE, its gather across ranks, and GradCache against the plain computation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embedder.training.contrastive import grad_cache_step, info_nce, plain_step


def _unit(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def test_info_nce_is_query_to_target_cross_entropy() -> None:
    q, t = _unit(6, 4, seed=0), _unit(6, 4, seed=1)
    tau = 0.02
    expected = 0.0
    for i in range(6):
        scores = [float(q[i] @ t[j]) / tau for j in range(6)]
        top = max(scores)
        log_z = top + math.log(sum(math.exp(s - top) for s in scores))
        expected += log_z - scores[i]
    loss, logged = info_nce(q, t, tau)
    assert loss.item() == pytest.approx(expected / 6, rel=1e-5)
    assert logged.item() == pytest.approx(expected / 6, rel=1e-5)
    # Only query-to-target: transposing the roles gives another number.
    assert info_nce(t, q, tau)[0].item() != pytest.approx(loss.item(), rel=1e-3)


def test_a_target_equal_to_the_own_positive_is_not_a_negative() -> None:
    q, t = _unit(4, 3, seed=2), _unit(4, 3, seed=3)
    t[2] = t[0]  # two clusters holding the same label
    ids = torch.tensor([7, 8, 7, 9])
    masked, _ = info_nce(q, t, 0.1, target_ids=ids)
    # Query 0 sees targets 1 and 3 as negatives, not target 2 (its own label again).
    logits = q[0] @ t.T / 0.1
    row0 = -logits[0] + torch.logsumexp(logits[[0, 1, 3]], 0)
    full = torch.stack(
        [
            -(q[i] @ t[i] / 0.1)
            + torch.logsumexp(
                (q[i] @ t.T / 0.1)[[j for j in range(4) if j == i or ids[j] != ids[i]]], 0
            )
            for i in range(4)
        ]
    ).mean()
    assert masked.item() == pytest.approx(full.item(), rel=1e-5)
    assert row0.item() < (-logits[0] + torch.logsumexp(logits, 0)).item()


def _expected(q: torch.Tensor, t: torch.Tensor, tau: float, kept: list[list[int]]) -> float:
    """The mean over rows i of logsumexp(logits[i, kept[i]]) - logits[i, i], in float64."""
    logits = q.double().numpy() @ t.double().numpy().T / tau
    rows = []
    for i, cols in enumerate(kept):
        assert i in cols, "a row's own positive is always in its denominator"
        top = logits[i, cols].max()
        rows.append(top + np.log(np.exp(logits[i, cols] - top).sum()) - logits[i, i])
    return float(np.mean(rows))


ALL = [0, 1, 2, 3]
# (query content ids, target content ids, per row the targets left in its denominator), worked
# out by hand from the rule: target j is masked from row i when it has the content of a
# positive of row i's query content (its own positive included), unless j == i.
MASK_CASES = {
    "none": ([0, 1, 2, 3], [10, 11, 12, 13], [ALL, ALL, ALL, ALL]),
    "same target twice": ([0, 1, 2, 3], [10, 11, 10, 13], [[0, 1, 3], ALL, [1, 2, 3], ALL]),
    "same query twice": ([0, 1, 0, 3], [10, 11, 12, 13], [[0, 1, 3], ALL, [1, 2, 3], ALL]),
    "same query thrice": ([5, 5, 2, 5], [10, 11, 12, 13], [[0, 2], [1, 2], ALL, [2, 3]]),
    # (q0, t10), (q0, t11), (q1, t11), (q2, t12): t11 is a positive of q0, so row 2's target
    # (another copy of t11) is masked for rows 0 and 1 as well; row 2's query q1 owns only t11.
    "both": ([0, 0, 1, 2], [10, 11, 11, 12], [[0, 3], [1, 3], [0, 2, 3], ALL]),
}


@pytest.mark.parametrize("case", list(MASK_CASES))
def test_a_querys_other_positives_and_equal_targets_are_not_its_negatives(case: str) -> None:
    q_ids, t_ids, kept = MASK_CASES[case]
    q, t = _unit(4, 3, seed=20), _unit(4, 3, seed=21)
    for i in range(4):  # equal content, equal embedding (as the model would give)
        q[i] = q[q_ids.index(q_ids[i])]
        t[i] = t[t_ids.index(t_ids[i])]
    loss, logged = info_nce(
        q, t, 0.1, target_ids=torch.tensor(t_ids), query_ids=torch.tensor(q_ids)
    )
    expected = _expected(q, t, 0.1, kept)
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert logged.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_one_query_with_two_positives_has_no_negatives_left() -> None:
    """(q, p0) and (q, p1) in one batch: neither positive is the other row's negative."""
    q = _unit(1, 3, seed=30).repeat(2, 1)
    t = _unit(2, 3, seed=31)
    loss, _ = info_nce(q, t, 0.02, target_ids=torch.tensor([1, 2]), query_ids=torch.tensor([7, 7]))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    unmasked, _ = info_nce(q, t, 0.02, target_ids=torch.tensor([1, 2]))
    assert unmasked.item() > 0.1, "without the query ids p1 is a negative of (q, p0)"


class _Encoder(torch.nn.Module):
    """A small encoder with dropout: GradCache must replay its masks."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.Dropout(0.3), torch.nn.GELU(), torch.nn.Linear(16, 8)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=-1)


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def test_grad_cache_equals_the_plain_computation_with_dropout_on() -> None:
    data = torch.randn(24, 8, generator=torch.Generator().manual_seed(5))
    queries, targets = data[:12].split(4), data[12:].split(4)  # three chunks each

    def loss_fn(q: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return info_nce(q, t, 0.05)

    results = []
    for step in (plain_step, grad_cache_step):
        model = _Encoder().train()
        torch.manual_seed(123)
        loss = step(model, queries, targets, loss_fn)
        results.append((loss.item(), _grads(model), torch.rand(1).item()))
    (plain_loss, plain_grads, plain_next), (gc_loss, gc_grads, gc_next) = results
    assert gc_loss == pytest.approx(plain_loss, rel=1e-6)
    for a, b in zip(plain_grads, gc_grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert gc_next == plain_next, "the RNG stream continues as after one plain pass"
    assert any(g.abs().sum() > 0 for g in gc_grads)


# Ranks hold different numbers of pairs (clusters differ in size): 5 and 3.
SPLIT = [slice(0, 5), slice(5, 8)]
# One query content in rows 1, 3 (rank 0) and 6 (rank 1); one target content in rows 2 (rank 0)
# and 7 (rank 1). The ids travel across ranks like the embeddings.
RANK_Q_IDS = [0, 100, 2, 100, 4, 5, 100, 7]
RANK_T_IDS = [50, 51, 52, 53, 54, 55, 56, 52]
EVERY = set(range(8))
RANK_KEPT = [
    sorted(EVERY),
    sorted(EVERY - {3, 6}),
    sorted(EVERY - {7}),
    sorted(EVERY - {1, 6}),
    sorted(EVERY),
    sorted(EVERY),
    sorted(EVERY - {1, 3}),
    sorted(EVERY - {2}),
]


def _rank_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    q, t = _unit(8, 5, seed=10), _unit(8, 5, seed=11)
    for i in range(8):  # equal content, equal embedding
        q[i] = q[RANK_Q_IDS.index(RANK_Q_IDS[i])]
        t[i] = t[RANK_T_IDS.index(RANK_T_IDS[i])]
    return q, t


def _rank_main(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    q_all, t_all = _rank_inputs()
    rows = SPLIT[rank]
    ids = {
        "query_ids": torch.tensor(RANK_Q_IDS)[rows],
        "target_ids": torch.tensor(RANK_T_IDS)[rows],
    }
    results = {}
    for name, kwargs in (("plain", {}), ("masked", ids)):
        q = q_all[rows].clone().requires_grad_()
        t = t_all[rows].clone().requires_grad_()
        loss, logged = info_nce(q, t, 0.05, **kwargs)
        loss.backward()
        results[name] = {"loss": loss.detach(), "logged": logged, "gq": q.grad, "gt": t.grad}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_two_ranks_gather_negatives_and_match_the_single_process_loss(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for name in ("plain", "masked"):
        q_all, t_all = (x.requires_grad_() for x in _rank_inputs())
        ids = {}
        if name == "masked":
            ids = {"query_ids": torch.tensor(RANK_Q_IDS), "target_ids": torch.tensor(RANK_T_IDS)}
        single, _ = info_nce(q_all, t_all, 0.05, **ids)
        single.backward()
        if name == "masked":
            expected = _expected(q_all.detach(), t_all.detach(), 0.05, RANK_KEPT)
            assert single.item() == pytest.approx(expected, rel=1e-5)
        for rank in (0, 1):
            got = torch.load(tmp_path / f"rank{rank}.pt")[name]
            assert got["logged"].item() == pytest.approx(single.item(), rel=1e-6)
            assert got["loss"].item() == pytest.approx(2 * single.item(), rel=1e-6)
            # DDP averages over the 2 ranks: each rank's gradient / 2 is the global gradient.
            rows = SPLIT[rank]
            torch.testing.assert_close(got["gq"] / 2, q_all.grad[rows], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(got["gt"] / 2, t_all.grad[rows], rtol=1e-5, atol=1e-7)
