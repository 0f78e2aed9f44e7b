"""Batches of whole clusters filled to a pair budget (embedder.training.batches)."""

from __future__ import annotations

import pytest

from embedder.training.batches import LOOKAHEAD, BatchPlan, pack_epoch

# (sizes, budget): uniform clusters (the random baseline), mixed sizes (SaHa's), sizes that
# cannot make the budget exactly, one cluster the size of the budget, singletons.
CASES = [
    pytest.param([16] * 40, 96, id="uniform-16"),
    pytest.param([16, 12, 9, 14, 3, 16, 7, 11, 16, 5, 8, 13] * 10, 96, id="mixed"),
    pytest.param([10] * 9, 15, id="budget-not-reachable"),
    pytest.param([96, 40, 56, 96, 20, 76], 96, id="a-cluster-of-the-budget"),
    pytest.param([1] * 50, 7, id="singletons"),
    pytest.param([5, 16, 2, 16, 16, 9, 1, 16] * 30, 256, id="paper-budget"),
]


@pytest.mark.parametrize(("sizes", "budget"), CASES)
@pytest.mark.parametrize("seed", [0, 3])
def test_an_epoch_is_whole_clusters_within_the_budget_each_once(
    sizes: list[int], budget: int, seed: int
) -> None:
    batches = pack_epoch(sizes, budget, seed, epoch=0)
    assert batches, "clusters holding a step's pairs make at least one batch"
    taken = [c for b in batches for c in b]
    assert len(taken) == len(set(taken)), "no cluster twice in an epoch"
    for batch in batches:
        pairs = sum(sizes[c] for c in batch)
        assert pairs <= budget
        if pairs < budget:
            # Short only when nothing left in the epoch could have filled it: every cluster
            # not taken up to here is larger than the room left.
            left = [c for c in range(len(sizes)) if c not in taken[: taken.index(batch[-1]) + 1]]
            room = budget - pairs
            assert all(sizes[c] > room for c in left[:LOOKAHEAD]) or not left
    # What is left out (the dropped tail) could not make one more full batch.
    rest = sorted(sizes[c] for c in set(range(len(sizes))) - set(taken))
    assert sum(rest) < budget or any(sum(sizes[c] for c in b) < budget for b in batches)


@pytest.mark.parametrize(
    ("sizes", "budget", "least_mean"),
    [
        ([16] * 40, 96, 96),  # the random baseline's clusters: 6 a step, always
        ([16] * 64, 256, 256),  # the paper's 16 clusters of 16
        ([16, 12, 9, 14, 3, 16, 7, 11, 16, 5, 8, 13] * 10, 96, 0.97 * 96),  # SaHa-like sizes
        (list(range(1, 17)) * 20, 96, 0.99 * 96),  # every size: the budget to the pair
    ],
)
def test_steps_hold_the_budget_whatever_the_cluster_sizes(
    sizes: list[int], budget: int, least_mean: float
) -> None:
    plan = BatchPlan(sizes, budget, seed=0)
    pairs = [plan.pairs(s) for s in range(60)]  # several epochs, their tails dropped
    assert max(pairs) <= budget and sum(pairs) / len(pairs) >= least_mean, pairs


def test_steps_are_a_pure_function_of_seed_and_step() -> None:
    sizes = [16, 12, 9, 14, 3, 16, 7, 11] * 6
    one = BatchPlan(sizes, 48, seed=0)
    steps = [one.step(s) for s in range(25)]  # several epochs
    # Another plan asked out of order (a resumed run) draws the same batches.
    other = BatchPlan(sizes, 48, seed=0)
    assert [other.step(s) for s in reversed(range(25))][::-1] == steps
    assert [BatchPlan(sizes, 48, seed=1).step(s) for s in range(25)] != steps
    # Consecutive epochs differ in order (a seeded permutation per epoch).
    per_epoch = len(pack_epoch(sizes, 48, 0, 0))
    assert steps[:per_epoch] != steps[per_epoch : 2 * per_epoch]


@pytest.mark.parametrize(("sizes", "budget"), CASES)
@pytest.mark.parametrize("ranks", [2, 3])
def test_ranks_share_the_global_batch_of_one_process(
    sizes: list[int], budget: int, ranks: int
) -> None:
    if max(sizes) * ranks > budget * ranks or sum(sizes) < budget * ranks:
        pytest.skip("the case does not fit this many ranks")
    if max(sizes) > budget:
        pytest.skip("a cluster over one rank's budget")
    split = BatchPlan(sizes, budget, seed=2, ranks=ranks)
    whole = BatchPlan(sizes, budget * ranks, seed=2)
    for step in range(12):
        shares = [split.share(step, r) for r in range(ranks)]
        assert all(shares), "every rank gets a cluster"
        loads = [sum(sizes[c] for c in s) for s in shares]
        assert max(loads) < budget + max(sizes), "over the budget by less than one cluster"
        assert sorted(c for s in shares for c in s) == sorted(whole.step(step))
        assert split.pairs(step) == whole.pairs(step)


@pytest.mark.parametrize(
    ("sizes", "budget", "ranks", "message"),
    [
        ([16, 17, 3], 16, 1, "the largest cluster holds 17 pairs, more than one rank's batch"),
        ([16, 16], 96, 1, "2 clusters of 32 pairs in all cannot fill one step of 96 pairs"),
        ([16] * 5, 48, 2, "5 clusters of 80 pairs in all cannot fill one step of 96 pairs"),
        ([], 8, 1, "0 clusters of 0 pairs in all cannot fill one step of 8 pairs"),
    ],
)
def test_clusters_that_cannot_make_a_step_are_refused(
    sizes: list[int], budget: int, ranks: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        BatchPlan(sizes, budget, seed=0, ranks=ranks)


def test_a_share_that_can_fit_the_budget_does() -> None:
    # Dealt in batch order, 5 and 5 would split and 10 overfill one rank (15 pairs).
    plan = BatchPlan([5, 5, 10], 10, seed=1, ranks=2)
    loads = sorted(sum(plan.sizes[c] for c in plan.share(0, r)) for r in range(2))
    assert loads == [10, 10]
