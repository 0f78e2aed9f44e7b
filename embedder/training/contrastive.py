"""The contrastive loss of docs/method.md section 4 and GradCache, which makes its batch size
independent of memory.

InfoNCE runs query-to-target only: each query's row of logits covers every target of the
global batch (all ranks), its own positive is the label. Under `torchrun` the embeddings are
gathered across ranks (this rank's slice keeps its autograd graph) and the loss is multiplied
by the world size, because DDP averages gradients over ranks: the averaged gradient is then
the gradient of the global batch's mean loss.

GradCache (Gao et al. 2021) computes that loss over a batch too large for one forward pass:
1. embed the batch in chunks without a graph, remembering each chunk's RNG state;
2. compute the loss on the detached embeddings and its gradient with respect to them;
3. embed each chunk again with a graph, under its remembered RNG state (so dropout draws the
   same masks as in step 1), and backpropagate the cached embedding gradient through it.
The result equals the plain computation's loss and parameter gradients; memory is that of
one chunk. Gradient accumulation is something else (it adds no negatives) and is not offered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(local: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, in rank order; only this rank's slice carries gradients (the others
    come from other processes, whose own backward passes handle them). Ranks may hold
    different numbers of rows (clusters differ in size): rows are padded for the exchange and
    cut back after it.

    `local`: (n_rank, ...) on this rank's device, the same trailing shape and dtype on every
    rank. Returns (sum of n_rank, ...) on that device; `local` itself when not distributed.
    A collective: every rank must call it, in the same order as the others' calls."""
    rank, size = world()
    if size == 1:
        return local
    count = torch.tensor([local.shape[0]], device=local.device)
    counts = [torch.empty_like(count) for _ in range(size)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    longest = max(sizes)
    padded = local.detach().new_zeros((longest, *local.shape[1:]))
    padded[: local.shape[0]] = local.detach()
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous())
    rows = [part[:n] for part, n in zip(parts, sizes, strict=True)]
    rows[rank] = local
    return torch.cat(rows)


def info_nce(
    queries: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    target_ids: torch.Tensor | None = None,
    query_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backpropagate, the global batch's mean loss for logging), both 0-d float.

    `queries[i]`'s positive is `targets[i]` (both (n, d), L2-normalised, this rank's pairs);
    every other target of the global batch is a negative except a positive of the same query
    content, which is masked (identity is content, as in docs/method.md section 3 step 1). With
    `target_ids` / `query_ids` ((n,) int64 content ids, e.g. from `item_key` of the rendered
    item; None: every row's content is its own), target j is masked from row i
    (j != i) when some row k has row i's query content and target j's content: so
    - a target equal to row i's own positive (two clusters holding the same class label);
    - row j's target when row j has the same query content as row i (one question, two
      answers: VQA and classification data, and SaHa's phase 2, put (q, p0) and (q, p1) in
      one batch);
    - a copy elsewhere of such a target.
    The ids are gathered across ranks like the embeddings, so the rule covers the global batch.

    `temperature` divides the cosine logits (0.02 in the paper, docs/method.md section 4).
    The loss is the mean cross-entropy over the global batch's queries, the first value
    scaled by the world size (see the module's note on DDP); both on `queries`' device.
    Distributed, a collective (`gather_with_grad`): every rank calls it.
    """
    size = world()[1]
    all_q = gather_with_grad(queries)
    all_t = gather_with_grad(targets)
    logits = all_q @ all_t.T / temperature
    n = len(all_q)
    labels = torch.arange(n, device=logits.device)
    if target_ids is not None or query_ids is not None:
        rows = torch.arange(n, device=logits.device)
        t_ids = rows if target_ids is None else gather_with_grad(target_ids)
        q_ids = rows if query_ids is None else gather_with_grad(query_ids)
        same_q = q_ids[:, None] == q_ids[None, :]  # (i, k): row k has row i's query
        same_t = t_ids[:, None] == t_ids[None, :]  # (k, j): row j has row k's target
        # Exact in float32: the counts are at most the global batch size.
        same = (same_q.float() @ same_t.float()) > 0
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    loss = F.cross_entropy(logits, labels)
    return loss * size, loss.detach()


@dataclass
class RandState:
    """The RNG state before a forward pass, to replay it (RandContext in GradCache)."""

    cpu: torch.Tensor
    cuda: list[torch.Tensor]

    @classmethod
    def capture(cls) -> RandState:
        """The current CPU RNG state and, once CUDA is initialised, every CUDA device's."""
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
        return cls(torch.get_rng_state(), cuda)

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run under this state; the global RNG is left as it was before."""
        devices = list(range(len(self.cuda)))
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


Encode = Callable[[Any], torch.Tensor]  # one chunk of inputs -> (n, d) normalised embeddings
Loss = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def plain_step(
    encode: Encode, query_chunks: Sequence[Any], target_chunks: Sequence[Any], loss_fn: Loss
) -> torch.Tensor:
    """The reference computation: every chunk embedded with its graph kept, then the loss's
    backward. Memory grows with the batch; GradCache must match it.

    `encode(chunk)`: (n, d) L2-normalised embeddings with a graph; `loss_fn(queries,
    targets)` as `info_nce` returns. Accumulates parameter gradients (call zero_grad
    before); returns the logged loss, a detached 0-d tensor."""
    q = torch.cat([encode(c) for c in query_chunks])
    t = torch.cat([encode(c) for c in target_chunks])
    loss, logged = loss_fn(q, t)
    loss.backward()
    return logged


def grad_cache_step(
    encode: Encode,
    query_chunks: Sequence[Any],
    target_chunks: Sequence[Any],
    loss_fn: Loss,
    no_sync: Callable[[], Any] | None = None,
) -> torch.Tensor:
    """One GradCache step; accumulates parameter gradients, returns the logged loss.

    `no_sync` (DDP's `model.no_sync`) keeps all but the last chunk's backward from
    all-reducing gradients; the last one reduces the sum once.

    `encode`, `loss_fn` and the result as in `plain_step`, which it matches (loss and
    gradients) when `encode` is deterministic given the RNG state; each chunk is embedded
    twice (no graph, then with one), so memory is that of one chunk. The chunks' queries
    and targets pair up row by row once concatenated."""
    chunks = [*query_chunks, *target_chunks]
    states, reps = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(RandState.capture())
            reps.append(encode(chunk))
    leaves = [r.detach().requires_grad_() for r in reps]
    n_q = len(query_chunks)
    loss, logged = loss_fn(torch.cat(leaves[:n_q]), torch.cat(leaves[n_q:]))
    loss.backward()
    for i, (chunk, state, leaf) in enumerate(zip(chunks, states, leaves, strict=True)):
        last = i == len(chunks) - 1
        sync = nullcontext() if last or no_sync is None else no_sync()
        with sync, state.replay():
            rep = encode(chunk)
            # d(loss)/d(params) = sum over rows of (d loss / d rep) . (d rep / d params)
            torch.autograd.backward(rep, grad_tensors=leaf.grad)
    return logged
