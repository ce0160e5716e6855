"""Grid patterns (``ffn.[0:4].[0:8]``): the expert server's ``--experts`` grammar, and
choosing free uids in them.

The uid grammar itself (a name, then integer coordinates without leading zeros) lives in
:mod:`services.common.expert_keys` with the rest of the DHT key scheme, which relies on exactly
that shape; a pattern that describes anything else is refused at start-up rather than
declared wrongly.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Awaitable, Callable, Iterable

from services.common.expert_keys import INT, NAME, is_valid_uid, make_uid, split_uid

_PATTERN_RE = re.compile(rf"^({NAME})((?:\.(?:{INT}|\[{INT}:{INT}\]))+)$")
_DIM_RE = re.compile(rf"\.(?:({INT})|\[({INT}):({INT})\])")


def parse_pattern(pattern: str) -> tuple[str, list[range]]:
    """``ffn.[0:4].7`` -> ``("ffn", [range(0, 4), range(7, 8)])``; ValueError when bad."""
    match = _PATTERN_RE.match(pattern)
    if not match:
        raise ValueError(
            f"bad expert pattern {pattern!r}: expected name followed by .int or .[start:stop] "
            "dimensions, e.g. ffn.[0:4].[0:8] or ffn.3.14"
        )
    name, dims = match.groups()
    ranges = []
    for single, start, stop in _DIM_RE.findall(dims):
        if single:
            ranges.append(range(int(single), int(single) + 1))
        else:
            if int(stop) <= int(start):
                raise ValueError(f"empty range [{start}:{stop}] in pattern {pattern!r}")
            ranges.append(range(int(start), int(stop)))
    return name, ranges


def split_patterns(text: str | Iterable[str]) -> list[str]:
    """Patterns separated by commas or whitespace (commas inside ``[a:b]`` cannot occur)."""
    parts = text if not isinstance(text, str) else [text]
    return [p for part in parts for p in part.replace(",", " ").split() if p]


def grid_size(patterns: Iterable[str]) -> int:
    total = 0
    for pattern in patterns:
        _, ranges = parse_pattern(pattern)
        size = 1
        for r in ranges:
            size *= len(r)
        total += size
    return total


def in_grid(patterns: Iterable[str], uid: str) -> bool:
    """Whether ``uid`` is one of the uids the patterns describe."""
    if not is_valid_uid(uid):
        return False
    name, coords = split_uid(uid)
    for pattern in patterns:
        pattern_name, ranges = parse_pattern(pattern)
        if (
            pattern_name == name
            and len(ranges) == len(coords)
            and all(c in r for c, r in zip(coords, ranges, strict=True))
        ):
            return True
    return False


def expand(patterns: Iterable[str]) -> list[str]:
    """Every uid the patterns describe, in order, without duplicates."""
    seen: dict[str, None] = {}
    for pattern in patterns:
        name, ranges = parse_pattern(pattern)
        for coords in itertools.product(*ranges):
            seen[make_uid(name, coords)] = None
    return list(seen)


def sample(patterns: list[str], rng: random.Random) -> str:
    """One uid drawn uniformly from the union of the grids (duplicates weigh more)."""
    sizes = []
    for pattern in patterns:
        name, ranges = parse_pattern(pattern)
        size = 1
        for r in ranges:
            size *= len(r)
        sizes.append((name, ranges, size))
    (name, ranges, _) = rng.choices(sizes, weights=[s for *_, s in sizes])[0]
    return make_uid(name, [rng.choice(r) for r in ranges])


async def choose_free_uids(
    patterns: list[str],
    count: int,
    is_declared: Callable[[list[str]], Awaitable[set[str]]] | None,
    *,
    rng: random.Random | None = None,
    max_rounds: int = 8,
) -> list[str]:
    """Pick ``count`` distinct uids at random, skipping those already declared in the DHT.

    ``is_declared(uids)`` returns the subset found in the DHT (one batched lookup per round),
    so scaled-out replicas started with the same pattern host different experts. Raises
    ``ValueError`` when the grid has no room: hosting a uid someone else declares would make
    the two servers overwrite each other's declarations.
    """
    rng = rng or random.Random()
    size = grid_size(patterns)
    if count > size:
        raise ValueError(f"--num-experts {count} exceeds the {size} uids the pattern allows")
    chosen: list[str] = []
    taken: set[str] = set()
    for _ in range(max_rounds):
        need = count - len(chosen)
        if need <= 0:
            break
        if size <= 4 * count:
            candidates = [u for u in expand(patterns) if u not in taken and u not in chosen]
            rng.shuffle(candidates)
        else:
            candidates = list({sample(patterns, rng): None for _ in range(4 * need)})
            candidates = [u for u in candidates if u not in taken and u not in chosen]
        declared = await is_declared(candidates) if is_declared else set()
        taken |= declared
        chosen += [u for u in candidates if u not in declared][:need]
    if len(chosen) < count:
        raise ValueError(
            f"found only {len(chosen)} of {count} free uids in {' '.join(patterns)} "
            "(the rest are declared by other servers)"
        )
    return chosen
