"""Remote forward/backward over real gRPC equal the local module; one backward = one local step;
compression stays within its documented bounds; 20 MiB requests and replies round-trip."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from helpers import run_async, serve_expert

from services.expert.backend import make_optimizer
from services.expert.server import ExpertServer
from services.proto import tensor_pb2

H = 32

CUSTOM = '''
import torch
from torch import nn

from services.expert.layers import Schema, register_expert_class


def _inputs(h):
    return [Schema((h,)), Schema((h,))]


def _outputs(h):
    return [Schema((h,)), Schema((1,))]


@register_expert_class("gated_test", inputs=_inputs, outputs=_outputs)
class Gated(nn.Module):
    """Two inputs, two outputs: exercises argument and result plumbing."""

    def __init__(self, hidden_dim):
        super().__init__()
        self.a = nn.Linear(hidden_dim, hidden_dim)
        self.b = nn.Linear(hidden_dim, 1)

    def forward(self, x, y):
        return torch.tanh(self.a(x)) * y, self.b(x * y)
'''


def _sample_inputs(server: ExpertServer, uid: str, rows: int) -> list[torch.Tensor]:
    torch.manual_seed(rows)
    return [s.sample(rows, free_dim=5) for s in server.backends[uid].input_schemas]


async def _check_class(expert_cls: str, custom: str | None = None) -> None:
    uid = f"{expert_cls}.0"
    async with serve_expert(experts=[uid], expert_cls=expert_cls, hidden_dim=H, seed=1,
                     custom_module=custom) as (server, client):  # fmt: skip
        backend = server.backends[uid]
        local = copy.deepcopy(backend.module)
        params = list(local.parameters())
        local_opt = make_optimizer(params, backend.optimizer_config) if params else None
        inputs = _sample_inputs(server, uid, 6)

        remote = await client.forward(uid, inputs, timeout=30)
        with torch.no_grad():
            expected = local(*inputs)
        expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
        assert len(remote) == len(expected)
        for r, e in zip(remote, expected, strict=True):
            assert r.shape == e.shape
            torch.testing.assert_close(r, e, atol=1e-5, rtol=0)

        grads_out = [torch.randn_like(e) for e in expected]
        remote_grads = await client.backward(uid, inputs, grads_out, timeout=30)
        leaves = [x.clone().requires_grad_(x.is_floating_point()) for x in inputs]
        outs = local(*leaves)
        outs = [outs] if isinstance(outs, torch.Tensor) else list(outs)
        torch.autograd.backward(outs, grads_out)
        for r, leaf in zip(remote_grads, leaves, strict=True):
            want = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
            assert r.shape == want.shape and r.dtype == want.dtype
            torch.testing.assert_close(r, want, atol=1e-5, rtol=0)

        # the server applied exactly one optimizer step, as the local optimizer does (with the
        # server's gradient clipping, on by default)
        before = [p.detach().clone() for p in params]
        if local_opt is not None:
            clip = backend.optimizer_config.clip_grad_norm
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(params, clip)
            local_opt.step()
        info = await client.info(uid)
        assert info.optimizer_steps == 1
        for mine, theirs in zip(params, backend.module.parameters(), strict=True):
            torch.testing.assert_close(theirs, mine, atol=1e-7, rtol=0)
        if params:  # and the step really changed something
            assert any(not torch.equal(p, q) for p, q in zip(params, before, strict=True))


@run_async
async def test_builtin_and_custom_classes_match_local(tmp_path: Path) -> None:
    custom = tmp_path / "gated_test.py"
    custom.write_text(CUSTOM)

    for cls in ("ffn", "transformer", "nop", "det_dropout"):
        await _check_class(cls)
    await _check_class("gated_test", str(custom))


# documented bounds (services/common/tensor_codec.py), per direction
def _bound(kind: int, x: torch.Tensor) -> torch.Tensor:
    if kind == tensor_pb2.COMPRESSION_FLOAT16:
        return x.abs() * 2.0**-11
    if kind == tensor_pb2.COMPRESSION_BFLOAT16:
        return x.abs() * 2.0**-8
    return torch.full_like(x, float(x.max() - x.min()) / 510 * (1 + 1e-5))


@run_async
async def test_compression_round_trips_within_bounds() -> None:
    async with serve_expert(experts=["nop.0"], expert_cls="nop", hidden_dim=256) as (_, client):
        torch.manual_seed(0)
        x = torch.randn(64, 256) * 3
        kinds = (
            tensor_pb2.COMPRESSION_FLOAT16,
            tensor_pb2.COMPRESSION_BFLOAT16,
            tensor_pb2.COMPRESSION_UINT8,
        )
        none = tensor_pb2.COMPRESSION_NONE
        for kind in kinds:
            for req, rep in ((kind, none), (none, kind)):
                (out,) = await client.forward("nop.0", [x], compression=req, reply_compression=rep)
                err = (out - x).abs()
                assert bool((err <= _bound(kind, x) + 1e-12).all()), (kind, float(err.max()))
                assert float(err.max()) > 0  # really lossy: the bound is what is tested
        (out,) = await client.forward("nop.0", [x])
        assert torch.equal(out, x)


@run_async
async def test_20_mib_request_and_reply_unary_and_streamed() -> None:
    rows, hidden = 5 * 1024, 1024  # 5120 x 1024 float32 = 20 MiB per tensor
    x = torch.randn(rows, hidden)
    g = torch.randn(rows, hidden)

    # default 64 MiB limit: forward fits a unary call; backward (40 MiB + reply) too
    async with serve_expert(experts=["nop.0"], expert_cls="nop", hidden_dim=hidden,
                     max_batch_size=8192) as (_, client):  # fmt: skip
        (out,) = await client.forward("nop.0", [x], timeout=60)
        assert torch.equal(out, x)
        (grad,) = await client.backward("nop.0", [x], [g], timeout=60)
        assert torch.equal(grad, g)
    # 4 MiB message limit on both sides: the same calls go over the streaming RPCs
    limit = 4 * 1024 * 1024
    async with serve_expert(experts=["nop.0"], expert_cls="nop", hidden_dim=hidden,
                     max_batch_size=8192, max_message_bytes=limit,
                     client_bytes=limit) as (server, client):  # fmt: skip
        (out,) = await client.forward("nop.0", [x], timeout=60)
        assert torch.equal(out, x)
        (grad,) = await client.backward("nop.0", [x], [g], timeout=60)
        assert torch.equal(grad, g)
        streamed = server.registry.get_sample_value(
            "dmoe_expert_rpc_requests_total", {"method": "ForwardStream", "code": "OK"}
        )
        assert streamed == 1
