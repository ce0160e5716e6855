"""Model architectures and the training loop in-process, over a real DHT and expert servers."""

import pytest
import torch

from services.trainer import checkpoint
from services.trainer.data import load_digits, load_text
from services.trainer.dispatch import CallPolicy
from services.trainer.models import MoEOptions, build_model
from services.trainer.moe import RemoteMixtureOfExperts
from services.trainer.remote_expert import RemoteExpert
from services.trainer.train import Trainer

H = 16
# every chosen expert answers on a loaded CI machine too (the default 5 s / 0.5 s are a swarm's)
PATIENT = CallPolicy(forward_timeout=60.0, timeout_after_k_min=60.0, backward_timeout=60.0)


pytestmark = pytest.mark.expert_swarm(
    *(
        {"experts": [pattern], "expert_cls": cls, "hidden_dim": H, "seed": 0}
        for pattern, cls in (
            ("ffn.[0:2].[0:2],ffn1.[0:2].[0:2]", "ffn"),
            ("seq.[0:2]", "transformer"),
        )
    )
)


def test_transformer_lm_with_dmoe_feedforward_learns(swarm, tmp_path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("abcdefgh" * 200)
    data = load_text(path, seq_len=8)
    torch.manual_seed(0)
    options = MoEOptions(grid_size=(2, 2), k_best=2, policy=PATIENT)
    model = build_model("transformer", swarm, data, options, hidden=H, layers=2, heads=2)
    prefixes = [m.uid_prefix for m in model.modules() if isinstance(m, RemoteMixtureOfExperts)]
    assert prefixes == ["ffn.", "ffn1."]
    trainer = Trainer(
        model,
        data,
        torch.optim.Adam(model.parameters(), 1e-2),
        batch_size=8,
        steps=30,
        eval_every=15,
    )
    state = trainer.train()
    assert state.step == 30 and state.failed_steps == 0
    assert state.history[-1]["test_loss"] < state.history[0]["test_loss"] * 0.7, state.history
    assert set(state.experts_in_use) <= {
        f"ffn{s}.{i}.{j}" for s in ("", "1") for i in range(2) for j in range(2)
    }
    with pytest.raises(ValueError, match="needs a text dataset"):
        build_model("transformer", swarm, load_digits(0), options, hidden=H)


def test_sequence_experts_get_whole_samples_and_their_attention_mask(swarm) -> None:
    """Transformer experts take two inputs, the sequence and its attention mask: the layer
    passes the extra input through, cut by sample."""
    layer = RemoteMixtureOfExperts(H, (2,), "seq", k_best=2, swarm=swarm, per_token=False)
    x = torch.randn(3, 5, H, requires_grad=True)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 3:] = False  # sample 0: two padding tokens
    y = layer(x, mask)
    assert y.shape == (3, 5, H)
    scores = layer.gating(x.detach().mean(1))
    found = layer.find_experts(scores)
    for b in range(3):
        weights = torch.softmax(
            torch.stack([scores[0][b, c] for c in found.coords[b, :, 0].tolist()]), 0
        )
        expected = sum(
            w
            * RemoteExpert(uid, found.addresses[uid], swarm=swarm)(
                x[b : b + 1].detach(), mask[b : b + 1]
            )[0]
            for w, uid in zip(weights, found.uids[b], strict=True)
        )
        assert torch.allclose(y[b], expected, atol=1e-4)
    unmasked = layer(x, torch.ones(3, 5, dtype=torch.bool))
    assert not torch.allclose(unmasked[0, :3], y[0, :3], atol=1e-4)  # the mask mattered
    assert torch.allclose(unmasked[1:], y[1:], atol=1e-4)
    y.sum().backward()
    assert x.grad.abs().sum() > 0


def test_trainer_checkpoint_restores_state(swarm, tmp_path) -> None:
    data = load_digits(0)
    options = MoEOptions(grid_size=(2, 2), k_best=2, policy=PATIENT)

    def make() -> Trainer:
        torch.manual_seed(0)
        model = build_model("mlp", swarm, data, options, hidden=H)
        return Trainer(
            model, data, torch.optim.Adam(model.parameters(), 1e-2), steps=12, eval_every=0,
            checkpoint_dir=str(tmp_path), checkpoint_every=5, lr_decay=True,
        )  # fmt: skip

    first = make()
    first.train()
    assert abs(first.optimizer.param_groups[0]["lr"] - 1e-2 / 12) < 1e-9  # decayed at step 11
    assert not list(tmp_path.glob(".*tmp"))  # only the renamed file is left
    saved = checkpoint.load(tmp_path)
    assert saved["state"]["step"] == 12 and saved["state"]["samples_seen"] == 12 * 64
    second = make()
    assert second.restore()
    assert second.state.step == 12 and second.state.samples_seen == 12 * 64
    for a, b in zip(
        first.model.state_dict().values(), second.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    assert (
        second.optimizer.state_dict()["state"][0]["step"]
        == first.optimizer.state_dict()["state"][0]["step"]
    )
    second.steps = 15
    assert second.train().step == 15


def test_user_model_module(swarm, tmp_path) -> None:
    module = tmp_path / "my_model.py"
    module.write_text(
        "from torch import nn\n"
        "from services.trainer.moe import RemoteMixtureOfExperts\n"
        "def build_model(swarm, dataset, moe):\n"
        "    layer = RemoteMixtureOfExperts(16, moe.grid_size, 'ffn', 2, swarm=swarm)\n"
        "    return nn.Sequential(nn.Linear(dataset.input_dim, 16), layer, nn.Linear(16, 10))\n"
    )
    data = load_digits(0)
    model = build_model(
        "mlp", swarm, data, MoEOptions(grid_size=(2, 2)), hidden=H, model_module=str(module)
    )
    assert model(data.test_x[:4]).shape == (4, 10)
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(ValueError, match="defines no build_model"):
        build_model("mlp", swarm, data, MoEOptions(), hidden=H, model_module=str(bad))
