"""DMoE layers over a real DHT node and real expert servers (in-process, 127.0.0.1)."""

import time

import pytest
import torch
from helpers import free_port

from services.common.identity import Identity
from services.dht.client import DHTClient
from services.dht.server import start_node
from services.expert.backend import OptimizerConfig
from services.expert.server import ExpertConfig, ExpertServer
from services.trainer.backoff import Backoff
from services.trainer.dispatch import CallPolicy, ExpertsUnavailableError
from services.trainer.gating import switch_balancing_loss
from services.trainer.moe import RemoteMixtureOfExperts, RemoteSwitchMixtureOfExperts
from services.trainer.remote_expert import RemoteExpert
from services.trainer.swarm import Swarm

H = 16
# the default policy's 5 s / 0.5 s are for a swarm, not for a loaded 2-core CI machine: where
# a test compares with a reference, every chosen expert must answer (timeouts only bound hangs)
PATIENT = CallPolicy(forward_timeout=60.0, timeout_after_k_min=60.0, backward_timeout=60.0)


pytestmark = pytest.mark.expert_swarm(
    *(
        {
            "experts": [pattern],
            "hidden_dim": H,
            "optimizer": OptimizerConfig(lr=0.0),
            "seed": 0,
        }
        for pattern in ("ffn.[0:3].[0:2],mix.1.[0:2]", "ffn.[0:3].[2:4]")
    ),
    cache_ttl=0.0,
)


def reference(layer: RemoteMixtureOfExperts, swarm: Swarm, x: torch.Tensor) -> torch.Tensor:
    """The layer's output recomputed with one RemoteExpert call per chosen expert."""
    scores = layer.gating(x)
    found = layer.find_experts(scores)
    out = torch.zeros(x.shape[0], layer.out_features)
    for b in range(x.shape[0]):
        logits = torch.stack(
            [
                sum(s[b, c] for s, c in zip(scores, found.coords[b, j].tolist(), strict=True))
                for j in range(len(found.uids[b]))
            ]
        )
        weights = torch.softmax(logits, 0)
        for j, uid in enumerate(found.uids[b]):
            expert = RemoteExpert(uid, found.addresses[uid], swarm=swarm)
            out[b] = out[b] + weights[j] * expert(x[b : b + 1])[0]
    return out


def test_mixture_matches_per_expert_reference_and_trains_gating(swarm) -> None:
    torch.manual_seed(0)
    layer = RemoteMixtureOfExperts(H, (3, 4), "ffn", k_best=3, swarm=swarm, policy=PATIENT)
    x = torch.randn(10, H, requires_grad=True)
    y = layer(x)
    assert y.shape == (10, H)
    assert torch.allclose(y, reference(layer, swarm, x.detach()), atol=1e-5)
    assert layer.experts_in_use <= {f"ffn.{i}.{j}" for i in range(3) for j in range(4)}
    y.pow(2).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert (
        layer.gating.proj.weight.grad is not None and layer.gating.proj.weight.grad.abs().sum() > 0
    )
    # the whole gradient equals the per-expert reference (lr=0 keeps weights fixed)
    x_ref = x.detach().clone().requires_grad_(True)
    reference(layer, swarm, x_ref).pow(2).mean().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)


def test_sequence_inputs_route_every_token(swarm) -> None:
    layer = RemoteMixtureOfExperts(H, (3, 4), "ffn.", k_best=2, swarm=swarm, policy=PATIENT)
    x = torch.randn(2, 5, H, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 5, H)
    flat = reference(layer, swarm, x.detach().reshape(10, H)).reshape(2, 5, H)
    assert torch.allclose(y, flat, atol=1e-5)
    y.sum().backward()
    assert x.grad.shape == x.shape
    with pytest.raises(ValueError, match="expected input"):
        layer(torch.randn(2, H + 1))


def brute_force_switch_loss(grid_scores, found) -> float:
    """Switch Transformer eq. 4 over every expert of the grid: N * sum_i f_i * P_i."""
    p0, p1 = (torch.softmax(s.detach(), -1) for s in grid_scores)
    full = p0[:, :, None] * p1[:, None, :]  # [batch, g0, g1]: p(expert) per sample
    n = full.shape[1] * full.shape[2]
    routed = torch.zeros(full.shape[1:])
    for c0, c1 in found.coords[:, 0].tolist():
        routed[c0, c1] += 1
    fraction = routed / len(found.coords)
    return float(n * (fraction * full.mean(0)).sum())


def test_switch_loss_is_the_papers_formula_and_jitter_only_trains() -> None:
    torch.manual_seed(2)
    scores = [torch.randn(50, 3, requires_grad=True), torch.randn(50, 5)]
    top1 = torch.stack([torch.randint(0, 3, (50,)), torch.randint(0, 5, (50,))], dim=1)

    class Found:
        coords = top1[:, None, :]

    loss = switch_balancing_loss(scores, top1, torch.ones(50, dtype=torch.bool))
    assert abs(float(loss.detach()) - brute_force_switch_loss(scores, Found)) < 1e-5
    loss.backward()
    assert scores[0].grad.abs().sum() > 0
    # uniform routing and probabilities: the minimum, 1
    flat = [torch.zeros(15, 3), torch.zeros(15, 5)]
    every = torch.tensor([[a, b] for a in range(3) for b in range(5)])
    assert (
        abs(float(switch_balancing_loss(flat, every, torch.ones(15, dtype=torch.bool))) - 1) < 1e-6
    )
    layer = RemoteSwitchMixtureOfExperts(H, (3, 4), "ffn", swarm=None, jitter=0.1)  # type: ignore[arg-type]
    x = torch.randn(64, H)
    ratio = layer._jitter(x) / x
    assert bool(((ratio >= 0.9) & (ratio <= 1.1)).all()) and ratio.std() > 0.01
    assert torch.equal(layer.eval()._jitter(x), x)


def test_switch_layer_balancing_loss_and_utilisation(swarm) -> None:
    torch.manual_seed(1)
    layer = RemoteSwitchMixtureOfExperts(H, (3, 4), "ffn", swarm=swarm, jitter=0.0, policy=PATIENT)
    x = torch.randn(32, H)
    y = layer(x)
    assert y.shape == (32, H)
    loss = layer.aux_loss
    found = layer.find_experts(layer.gating(x))
    assert abs(float(loss.detach()) - brute_force_switch_loss(layer.gating(x), found)) < 1e-5
    loss.backward()
    assert layer.gating.proj.weight.grad.abs().sum() > 0
    for util, g in zip(layer.grid_utilization, (3, 4), strict=True):
        assert util.shape == (g,) and abs(float(util.sum()) - 1.0) < 1e-5
    # output = p(expert) * expert(x) for the single chosen expert
    scores = layer.gating(x)
    found = layer.find_experts(scores)
    b, uid = 0, found.uids[0][0]
    p = (
        torch.softmax(scores[0][b], 0)[found.coords[b, 0, 0]]
        * torch.softmax(scores[1][b], 0)[found.coords[b, 0, 1]]
    )
    expected = p * RemoteExpert(uid, found.addresses[uid], swarm=swarm)(x[b : b + 1])[0]
    assert torch.allclose(y[b], expected, atol=1e-5)


def test_all_experts_gone_error_or_zeros_promptly(swarm) -> None:
    """Experts still declared but their server is gone; then nothing declared at all."""
    dead = f"127.0.0.1:{free_port()}".encode()
    expiration = time.time() + 60
    items = [("gone.", str(i), dead, expiration) for i in range(3)]
    items += [(f"gone.{i}.", str(j), dead, expiration) for i in range(3) for j in range(2)]

    async def declare():
        async with DHTClient(swarm.initial_peers, identity=Identity.generate()) as client:
            assert all(await client.put(items, owned=True))

    swarm.run(declare())
    layer = RemoteMixtureOfExperts(
        H, (3, 2), "gone", k_best=2, swarm=swarm, policy=CallPolicy(forward_timeout=60.0)
    )
    started = time.perf_counter()
    with pytest.raises(ExpertsUnavailableError, match="fewer than k_min"):
        layer(torch.randn(4, H))
    assert time.perf_counter() - started < 30.0  # refused connections end the wait early
    zeros = RemoteMixtureOfExperts(
        H,
        (3, 2),
        "gone",
        k_best=2,
        swarm=swarm,
        policy=CallPolicy(allow_zero_outputs=True, forward_timeout=20.0),
    )
    out = zeros(torch.randn(4, H, requires_grad=True))
    assert out.shape == (4, H) and bool((out == 0).all())
    out.sum().backward()  # nothing answered: nothing to call back, no hang
    nothing = RemoteMixtureOfExperts(H, (3, 2), "never", k_best=2, swarm=swarm)
    with pytest.raises(ExpertsUnavailableError, match="no live experts found"):
        nothing(torch.randn(4, H))


def test_failing_experts_are_skipped_for_a_while() -> None:
    clock = [0.0]
    backoff = Backoff(
        base=1.0, maximum=8.0, threshold=2, address_threshold=3, clock=lambda: clock[0]
    )
    backoff.failure("ffn.1", "a:1")
    assert not backoff.is_skipped("ffn.1", "a:1")  # one failure is forgiven
    backoff.failure("ffn.1", "a:1")
    assert backoff.is_skipped("ffn.1", "a:1")
    assert not backoff.is_skipped("ffn.2", "a:1")
    backoff.failure("ffn.2", "a:1")  # third failure in a row on the server: all of it skipped
    assert backoff.is_skipped("ffn.3", "a:1") and not backoff.is_skipped("ffn.3", "b:1")
    clock[0] = 1.5
    assert not backoff.is_skipped("ffn.1", "a:1")
    backoff.failure("ffn.1", "a:1")  # the third in a row doubles the pause
    clock[0] = 3.0
    assert backoff.is_skipped("ffn.1")
    backoff.success("ffn.1", "a:1")
    assert not backoff.is_skipped("ffn.1", "a:1")


def test_samples_whose_experts_fail_are_retried_with_the_next_best(swarm) -> None:
    """The best experts (``mix.0.*``) are declared but dead; the retry round finds ``mix.1.*``."""
    dead = f"127.0.0.1:{free_port()}".encode()
    expiration = time.time() + 60
    items = [("mix.", "0", dead, expiration), ("mix.0.", "0", dead, expiration)]
    items += [("mix.0.", "1", dead, expiration)]

    async def declare():
        async with DHTClient(swarm.initial_peers, identity=Identity.generate()) as client:
            assert all(await client.put(items, owned=True))

    swarm.run(declare())
    swarm.backoff.success("mix.0.0", dead.decode())
    torch.manual_seed(3)
    layer = RemoteMixtureOfExperts(
        H, (2, 2), "mix", k_best=2, swarm=swarm, policy=CallPolicy(forward_timeout=20.0)
    )
    with torch.no_grad():
        layer.gating.proj.bias[0] = 100.0  # every sample prefers coordinate 0 of dimension 0
    x = torch.randn(5, H, requires_grad=True)
    y = layer(x)
    assert layer.experts_in_use == {"mix.1.0", "mix.1.1"}
    scores = layer.gating(x.detach())
    expected = torch.zeros(5, H)
    for b in range(5):
        weights = torch.softmax(torch.stack([scores[0][b, 1] + scores[1][b, j] for j in (0, 1)]), 0)
        for j in (0, 1):
            address = swarm.servers[0].address
            expert = RemoteExpert(f"mix.1.{j}", address, swarm=swarm)
            expected[b] += weights[j] * expert(x[b : b + 1].detach())[0]
    assert torch.allclose(y, expected, atol=1e-5)
    y.sum().backward()
    assert x.grad.abs().sum() > 0
    no_retry = RemoteMixtureOfExperts(
        H,
        (2, 2),
        "mix",
        k_best=2,
        swarm=swarm,
        policy=CallPolicy(forward_retries=0, forward_timeout=20.0),
    )
    no_retry.load_state_dict(layer.state_dict())
    swarm.backoff.success("mix.0.0", dead.decode())  # forget: the dead ones are tried first
    swarm.backoff.success("mix.0.1", dead.decode())
    with pytest.raises(ExpertsUnavailableError):
        no_retry(x)


TWO_OUTPUTS = """
import torch
from torch import nn
from services.expert.layers import Schema, register_expert_class

def _one(h):
    return [Schema((h,))]

def _two(h):
    return [Schema((h,)), Schema((2,))]

@register_expert_class("two_out", inputs=_one, outputs=_two)
class TwoOutputs(nn.Module):
    def __init__(self, hidden_dim):
        super().__init__()
        self.proj = nn.Linear(hidden_dim, hidden_dim)
        self.head = nn.Linear(hidden_dim, 2)

    def forward(self, x):
        y = self.proj(x)
        return y, self.head(y)
"""


def test_experts_with_several_outputs(tmp_path) -> None:
    """Each output of a multi-output expert is averaged with the same gating weights."""
    module = tmp_path / "two_out.py"
    module.write_text(TWO_OUTPUTS)
    swarm = Swarm(None, cache_ttl=0.0)
    node = swarm.run(start_node())
    swarm.initial_peers = [node.address]
    server = swarm.run(
        ExpertServer(
            ExpertConfig(
                experts=["two.[0:3]"], expert_cls="two_out", custom_module=str(module),
                hidden_dim=H, seed=0, dht_peers=[node.address], optimizer=OptimizerConfig(lr=0.0),
            )
        ).start()
    )  # fmt: skip
    try:
        swarm.run(server.declarer.first_success.wait(), timeout=20)
        torch.manual_seed(0)
        layer = RemoteMixtureOfExperts(
            H, (3,), "two", k_best=2, swarm=swarm, output_shapes=[(H,), (2,)], policy=PATIENT
        )
        x = torch.randn(4, H, requires_grad=True)
        y, z = layer(x)
        assert y.shape == (4, H) and z.shape == (4, 2)
        scores = layer.gating(x.detach())
        found = layer.find_experts(scores)
        for b in range(4):
            weights = torch.softmax(scores[0][b, found.coords[b, :, 0]], 0)
            parts = [
                RemoteExpert(uid, found.addresses[uid], swarm=swarm)(x[b : b + 1].detach())
                for uid in found.uids[b]
            ]
            for i, out in enumerate((y, z)):
                expected = sum(w * p[i][0] for w, p in zip(weights, parts, strict=True))
                assert torch.allclose(out[b], expected, atol=1e-5)
        (y.sum() + z.sum()).backward()
        assert x.grad.abs().sum() > 0
    finally:
        swarm.run(server.stop(0))
        swarm.run(node.stop())
        swarm.close()
