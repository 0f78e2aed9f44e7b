"""Which clusters make each fine-tuning step: whole clusters filled up to a pair budget.

A step's batch is measured in pairs, not clusters, so every table row trains on the same
number of pairs a step whatever its clusters' sizes (SaHa's hold fewer pairs than the
random baseline's 16 in the miniature world; docs/method.md section 3, "Batches"). The
paper's recipe is 16 clusters of 16 pairs per GPU, 256 pairs: `finetune.pairs_per_batch`.

Each epoch is a seeded permutation of the clusters, packed first-fit: a batch takes the next
clusters of the permutation while they fit the budget; one that does not fit waits for the
next batch, while the batch looks up to `LOOKAHEAD` waiting clusters further for one that
does. A batch is closed when it holds the budget exactly or no cluster within the look-ahead
fits; a batch short of the budget only because the epoch ran out of clusters (none was
passed over) is the epoch's tail and dropped, as a loader's drop_last does. The
batches of step s are therefore a pure function of (cluster sizes, budget, seed, s): a
resumed run, or another number of ranks over the same global budget, draws the same ones.

Several ranks: a global batch of `pairs_per_batch x ranks` pairs is packed once and its
clusters are dealt to the ranks, largest first, each to the rank holding the fewest pairs
(the loss gathers the global batch, so how the clusters are dealt changes no number; a rank
may hold up to one cluster more than `pairs_per_batch`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np

# How many clusters that do not fit a batch it looks past for one that does: enough to fill
# a batch of mixed sizes to the pair, bounded so packing an epoch stays linear in clusters.
LOOKAHEAD = 64


def pack_epoch(sizes: Sequence[int], budget: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch, each a list of cluster indices in the order taken.

    `sizes[c]`: pairs in cluster c (>= 1); `budget`: pairs a batch holds at most. A batch
    holds exactly `budget` pairs unless none of the clusters it passed over (at most
    `LOOKAHEAD`) fitted; the tail, short with none passed over, is dropped. No cluster
    appears twice in an epoch; when the clusters hold `budget` pairs or more together there
    is at least one batch. Raises ValueError when a cluster is larger than the budget (it
    could never be taken whole)."""
    if sizes and max(sizes) > budget:
        raise ValueError(f"a cluster of {max(sizes)} pairs cannot fit a batch of {budget}")
    order = np.random.default_rng([seed, epoch]).permutation(len(sizes)).tolist()
    waiting: deque[int] = deque(order)
    batches: list[list[int]] = []
    while waiting:
        batch: list[int] = []
        skipped: list[int] = []
        total = 0
        while waiting and total < budget and len(skipped) < LOOKAHEAD:
            cluster = waiting.popleft()
            if total + sizes[cluster] <= budget:
                batch.append(cluster)
                total += sizes[cluster]
            else:
                skipped.append(cluster)
        if total < budget and not skipped:
            # Short of the budget only because the epoch ran out of clusters: its tail.
            break
        waiting.extendleft(reversed(skipped))  # they lead the next batch, in order
        batches.append(batch)
    return batches


class BatchPlan:
    """The clusters of every step of a run, for `ranks` ranks of `budget` pairs each.

    `sizes[c]`: pairs in cluster c. `step(s)` and `share(s, rank)` depend on (sizes,
    budget x ranks, seed, s) only. Epochs are packed when first asked for and kept (an epoch
    is a list of lists of ints: small next to the model). Raises ValueError, from the
    constructor, when the clusters hold fewer pairs than one step or a cluster is larger
    than `budget` (one rank's share must hold it whole)."""

    def __init__(self, sizes: Sequence[int], budget: int, seed: int, ranks: int = 1) -> None:
        if budget < 1 or ranks < 1:
            raise ValueError(f"budget ({budget}) and ranks ({ranks}) must be >= 1")
        self.sizes = list(sizes)
        self.budget = budget * ranks
        self.seed = seed
        self.ranks = ranks
        largest = max(self.sizes, default=0)
        if largest > budget:
            raise ValueError(
                f"the largest cluster holds {largest} pairs, more than one rank's batch of {budget}"
            )
        if sum(self.sizes) < self.budget:
            raise ValueError(
                f"{len(self.sizes)} clusters of {sum(self.sizes)} pairs in all cannot fill "
                f"one step of {self.budget} pairs"
            )
        self._epochs: list[list[list[int]]] = []

    def _epoch(self, epoch: int) -> list[list[int]]:
        while len(self._epochs) <= epoch:
            packed = pack_epoch(self.sizes, self.budget, self.seed, len(self._epochs))
            # Never empty: the constructor checked the clusters hold a step's pairs.
            self._epochs.append(packed)
        return self._epochs[epoch]

    def step(self, step: int) -> list[int]:
        """Cluster indices of global step `step` (0-based, counting over all epochs)."""
        if step < 0:
            raise ValueError(f"step {step} < 0")
        epoch = 0
        while step >= len(self._epoch(epoch)):
            step -= len(self._epoch(epoch))
            epoch += 1
        return self._epoch(epoch)[step]

    def pairs(self, step: int) -> int:
        """Pairs in step `step`'s global batch."""
        return sum(self.sizes[c] for c in self.step(step))

    def share(self, step: int, rank: int) -> list[int]:
        """Rank `rank`'s clusters of step `step`, in batch order: dealt largest first (batch
        order among equals), each to the rank holding the fewest pairs so far (the lowest
        rank on a tie).

        Every rank gets at least one cluster: a kept batch is full or passed a cluster over,
        so it holds more than (ranks - 1) x the per-rank budget (any cluster fits the rest),
        and no cluster is larger than that budget. A rank's share may exceed the per-rank
        budget by less than one cluster (a cluster joins the least-loaded rank, which holds
        at most the global batch's mean), so with GradCache off the per-device memory is
        sized for `budget` plus one cluster."""
        if not 0 <= rank < self.ranks:
            raise ValueError(f"rank {rank} outside 0..{self.ranks - 1}")
        batch = self.step(step)
        held = [0] * self.ranks
        mine: list[int] = []
        for cluster in sorted(batch, key=lambda c: -self.sizes[c]):
            to = held.index(min(held))
            held[to] += self.sizes[cluster]
            if to == rank:
                mine.append(cluster)
        position = {c: i for i, c in enumerate(batch)}
        return sorted(mine, key=position.__getitem__)
