"""Beam search for the best live experts of a grid, through one batched DHT lookup per dimension.

An expert ``ffn.3.14`` has the score ``s0[3] + s1[14]``: the gating function scores every
coordinate of every grid dimension. Scoring all experts of a 32x32x32 grid would mean asking
the DHT about 32,768 keys; instead, level ``t`` of the search keeps, per sample, the ``beam_size``
best prefixes of length ``t`` that some live expert declared, and asks the DHT once (one
batched get for the unique prefixes of the whole batch) which coordinates of dimension
``t + 1`` are alive under them. The last dimension's answer carries the servers' addresses.

Trade-off: with beam width ``k`` the result is exactly the top-k of an exhaustive search when
the live set is a product of per-dimension sets (every prefix has the same live completions,
the case of a fully populated sub-grid); on a sparse, irregular population a prefix with a
high score but only poor completions can push out a better one, as in the Learning@home paper.
A larger ``beam_size`` narrows that gap at the cost of more keys per lookup.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import torch

from services.common.expert_keys import make_uid, normalize_prefix, prefix_key

# prefix ("ffn.3.") -> {coordinate: [server address, ...]}: the servers that declared it
# (on the last level, the replicas hosting that expert).
ChildrenFn = Callable[[list[str]], Awaitable[dict[str, dict[int, list[str]]]]]


@dataclass
class BeamSearchResult:
    """Per sample, up to ``k_best`` live experts sorted by score (best first).

    ``coords[b, j]`` are the grid coordinates of sample ``b``'s ``j``-th expert, ``-1`` where
    fewer than ``k_best`` live experts exist; ``valid`` marks real entries.
    """

    coords: torch.Tensor  # [batch, k, dims] int64
    scores: torch.Tensor  # [batch, k] float, -inf where invalid
    valid: torch.Tensor  # [batch, k] bool
    uids: list[list[str]]
    addresses: dict[str, str]  # uid -> host:port


async def beam_search(
    grid_scores: Sequence[torch.Tensor],
    uid_prefix: str,
    k_best: int,
    children: ChildrenFn,
    *,
    beam_size: int | None = None,
    exclude: Callable[[str, str], bool] | None = None,
) -> BeamSearchResult:
    """Find, per sample, the ``k_best`` live experts with the highest summed scores.

    ``grid_scores[t]`` is ``[batch, grid_size[t]]``. ``children(prefixes)`` answers, for each
    prefix, the live coordinates of the next dimension (one batched DHT get per call; it is
    called exactly ``len(grid_scores)`` times). ``exclude(uid, address)`` drops a server of an
    expert (for example one in back-off) before the final top-k: another server hosting the
    same expert serves instead, or, when none is left, the next best live expert.
    """
    if k_best < 1:
        raise ValueError("k_best must be >= 1")
    if not grid_scores:
        raise ValueError("the grid needs at least one dimension")
    prefix = normalize_prefix(uid_prefix)
    width = max(beam_size or k_best, k_best)
    scores = [s.detach().float() for s in grid_scores]
    batch = scores[0].shape[0]
    dims = len(scores)

    beam_coords = torch.zeros(batch, 1, 0, dtype=torch.long)
    beam_scores = torch.zeros(batch, 1)
    addresses: dict[str, str] = {}
    for t, dim_scores in enumerate(scores):
        last = t == dims - 1
        grid = dim_scores.shape[1]
        valid = torch.isfinite(beam_scores)
        flat = beam_coords.reshape(batch * beam_coords.shape[1], t)
        flat_valid = valid.reshape(-1)
        inverse = torch.zeros(flat.shape[0], dtype=torch.long)
        if t == 0:
            unique = torch.zeros(1, 0, dtype=torch.long)
        elif flat_valid.any():
            unique, inverse_valid = torch.unique(flat[flat_valid], dim=0, return_inverse=True)
            inverse[flat_valid] = inverse_valid
        else:
            unique = torch.zeros(0, t, dtype=torch.long)
        keys = [prefix_key(prefix, row.tolist()) for row in unique]
        found = await children(keys) if keys else {}
        alive = torch.zeros(len(keys) + 1, grid, dtype=torch.bool)  # last row: invalid beams
        for u, key in enumerate(keys):
            for coord, servers in (found.get(key) or {}).items():
                if not 0 <= coord < grid or not servers:
                    continue
                if last:
                    uid = key + str(coord)
                    usable = [a for a in servers if exclude is None or not exclude(uid, a)]
                    if not usable:
                        continue
                    addresses[uid] = usable[0]
                alive[u, coord] = True
        inverse = torch.where(flat_valid, inverse, torch.full_like(inverse, len(keys)))
        beam_alive = alive[inverse].view(batch, -1, grid)
        candidates = beam_scores.unsqueeze(-1) + dim_scores.unsqueeze(1)
        candidates = candidates.masked_fill(~beam_alive, float("-inf")).view(batch, -1)
        keep = min(k_best if last else width, candidates.shape[1])
        top_scores, top_index = candidates.topk(keep, dim=1)
        parent = top_index // grid
        chosen = top_index % grid
        parent_coords = torch.gather(
            beam_coords, 1, parent.unsqueeze(-1).expand(-1, -1, beam_coords.shape[2])
        )
        beam_coords = torch.cat([parent_coords, chosen.unsqueeze(-1)], dim=-1)
        beam_scores = top_scores

    valid = torch.isfinite(beam_scores)
    if beam_scores.shape[1] < k_best:  # a grid smaller than k_best: pad
        pad = k_best - beam_scores.shape[1]
        beam_scores = torch.cat([beam_scores, torch.full((batch, pad), float("-inf"))], 1)
        beam_coords = torch.cat([beam_coords, torch.zeros(batch, pad, dims, dtype=torch.long)], 1)
        valid = torch.cat([valid, torch.zeros(batch, pad, dtype=torch.bool)], 1)
    beam_coords = beam_coords.masked_fill(~valid.unsqueeze(-1), -1)
    uids = [
        [make_uid(prefix, c) for c, ok in zip(row.tolist(), row_ok.tolist(), strict=True) if ok]
        for row, row_ok in zip(beam_coords, valid, strict=True)
    ]
    used = {uid for row in uids for uid in row}
    return BeamSearchResult(
        coords=beam_coords,
        scores=beam_scores,
        valid=valid,
        uids=uids,
        addresses={uid: addr for uid, addr in addresses.items() if uid in used},
    )
