"""The averager end to end (issue 17): peers as real processes (``benchmarks/averaging_peer.py``),
real DHT nodes, real gRPC on 127.0.0.1. Each peer knows every peer's inputs, so it reports how
far its result is from the exact weighted mean of what its result holds."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import averaging  # noqa: E402


def run(tmp: Path, peers: int, rounds: int, *flags: str, extra: tuple[str, ...] = (),
        hostile: dict[int, str] | None = None) -> dict[int, list[dict[str, Any]]]:  # fmt: skip
    """Every peer's rounds, by peer index."""
    flags = ("--peers", str(peers), "--rounds", str(rounds), "--window", "3", *flags)
    args = averaging.parse_args([*flags, "--timeout", "300"])
    report = averaging.run_ours(args, tmp, ["--reduce-timeout", "10", *extra], hostile)
    return {rep["index"]: rep["rounds"] for rep in report["reports"]}


def test_four_peers_end_with_the_exact_weighted_mean(tmp_path: Path) -> None:
    for compression, tolerance in (("none", 1e-5), ("float16", 1e-2)):
        result = run(tmp_path / compression, 4, 2, "--size", "300000", "--compression",
                     compression, extra=("--weights", "index"))  # fmt: skip
        assert sorted(result) == [0, 1, 2, 3]
        for r in range(2):
            rounds = [result[i][r] for i in range(4)]
            assert all(x["outcome"] == "ok" and x["group"] == [0, 1, 2, 3] for x in rounds), rounds
            assert max(x["max_abs_error"] for x in rounds) <= tolerance, (compression, rounds)
            # every member ends with the same bytes (the reducer keeps what the wire carries)
            assert len({x["digest"] for x in rounds}) == 1, rounds


def test_a_member_killed_mid_round_leaves_the_others_finite_and_the_next_round_succeeds(
    tmp_path: Path,
) -> None:
    result = run(tmp_path, 4, 2, "--size", "200000", "--compression", "none",
                 hostile={3: "die"})  # fmt: skip
    assert sorted(result) == [0, 1, 2]  # the killed peer wrote no report
    first = [result[i][0] for i in range(3)]
    assert all(x["finite"] for x in first), first
    # all or nothing: those who averaged agree; the others kept their own vector untouched
    assert len({x["digest"] for x in first if x["outcome"] == "ok"}) <= 1, first
    assert all(x["kept_own"] for x in first if x["outcome"] != "ok"), first
    assert any(x["outcome"] == "failed" for x in first), first  # its part never came back
    second = [result[i][1] for i in range(3)]
    assert all(x["outcome"] == "ok" and x["group"] == [0, 1, 2] for x in second), second
    assert max(x["max_abs_error"] for x in second) <= 1e-5
    assert len({x["digest"] for x in second}) == 1


def test_a_hostile_member_is_refused_or_clipped_within_the_bound(tmp_path: Path) -> None:
    modes = ["huge", "nan", "wrong-size", "noise"]
    result = run(tmp_path, 4, len(modes) + 1, "--size", "200000", "--compression", "none",
                 extra=("--hostile-peer", "3"),
                 hostile={3: ",".join([*modes, "bad-reducer"])})  # fmt: skip
    for r, mode in enumerate(modes):
        honest = [result[i][r] for i in range(3)]
        assert all(x["outcome"] == "ok" and x["finite"] for x in honest), (mode, honest)
        assert len({x["digest"] for x in honest}) == 1, (mode, honest)
        for x in honest:
            for error, bound in zip(x["honest_error"], x["bound"], strict=True):
                assert error <= bound * (1 + 1e-3) + 1e-3, (mode, error, bound)
            if mode in ("nan", "wrong-size"):  # refused: the parts it did not reduce are exact
                assert x["max_abs_error"] <= 1e-5, (mode, x)
    # a member that lies about the part it reduces: the others refuse the result, keep their own
    lied = [result[i][len(modes)] for i in range(3)]
    assert all(x["outcome"] == "failed" and x["kept_own"] and x["finite"] for x in lied), lied
    assert all("moved" in x["reason"] for x in lied), lied


def test_groups_of_a_twelve_peer_swarm_mix_across_rounds(tmp_path: Path) -> None:
    rounds = 3
    result = run(tmp_path, 12, rounds, "--size", "20000", "--target-group-size", "4",
                 "--compression", "none")  # fmt: skip
    assert sorted(result) == list(range(12))
    partners: dict[int, set[int]] = {i: set() for i in range(12)}
    groups_by_round = []
    for r in range(rounds):
        ok = [result[i][r] for i in range(12) if result[i][r]["outcome"] == "ok"]
        assert len(ok) >= 8, [result[i][r] for i in range(12)]  # most peers averaged
        groups_by_round.append({tuple(x["group"]) for x in ok})
        for i in range(12):
            if result[i][r]["outcome"] == "ok":
                assert 2 <= len(result[i][r]["group"]) <= 5
                partners[i] |= set(result[i][r]["group"]) - {i}
    # a new shuffle every slot: the partitions differ, and peers meet more than one group's worth
    assert len(set(map(frozenset, groups_by_round))) == rounds, groups_by_round
    assert sum(len(p) > 3 for p in partners.values()) >= 10, partners
