"""Named model architectures whose hidden layers are DMoE layers.

- ``mlp``: ``Linear(in, h) -> ReLU -> DMoE(h) x layers [-> LayerNorm] -> Linear(h, classes)``
  for classification (digits, MNIST); the LayerNorm (``final_norm``) is the Learning@home
  paper's MNIST model. A grid of one expert with ``k_best=1`` makes it a dense model whose
  blocks are hosted remotely (the paper's baseline, trained by all trainers asynchronously).
- ``transformer``: a small pre-norm character LM; each block is causal self-attention
  followed by a DMoE feed-forward sublayer over ``[batch, seq, h]`` (routed per token).
- a user's ``--model-module path.py`` that defines ``build_model(swarm, dataset, options)``.

Layer ``i`` of a model uses the grid ``<uid_prefix>`` for ``i = 0`` and ``<uid_prefix><i>``
otherwise (``ffn``, ``ffn1``, ...), so each layer has its own experts.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from services.trainer.data import Dataset
from services.trainer.moe import RemoteMixtureOfExperts, RemoteSwitchMixtureOfExperts
from services.trainer.options import MoEOptions
from services.trainer.swarm import Swarm


def make_moe(options: MoEOptions, swarm: Swarm, hidden: int, index: int) -> RemoteMixtureOfExperts:
    cls = RemoteSwitchMixtureOfExperts if options.kind == "switch" else RemoteMixtureOfExperts
    k_best = 1 if options.kind == "switch" else options.k_best
    policy = replace(options.policy, k_min=min(options.policy.k_min, k_best))
    return cls(
        hidden, options.grid_size, options.layer_prefix(index), k_best, swarm=swarm, policy=policy
    )


class MoEMLP(nn.Module):
    def __init__(
        self,
        in_features: int,
        hidden: int,
        classes: int,
        layers: int,
        moe: MoEOptions,
        swarm: Swarm,
        final_norm: bool = False,
    ) -> None:
        super().__init__()
        self.inp = nn.Linear(in_features, hidden)
        self.moe = nn.ModuleList(make_moe(moe, swarm, hidden, i) for i in range(layers))
        self.norm = nn.LayerNorm(hidden) if final_norm else nn.Identity()
        self.out = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        for layer in self.moe:
            h = layer(h)
        return self.out(self.norm(h))


class MoEBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, moe: nn.Module) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.moe = moe

    def forward(self, x: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        return x + self.moe(self.ln2(x))


class MoETransformerLM(nn.Module):
    """A character LM: ``ids [batch, seq] -> logits [batch, seq, vocab]``."""

    def __init__(
        self,
        vocab: int,
        seq_len: int,
        hidden: int,
        heads: int,
        layers: int,
        moe: MoEOptions,
        swarm: Swarm,
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, hidden)
        self.pos = nn.Embedding(seq_len, hidden)
        self.blocks = nn.ModuleList(
            MoEBlock(hidden, heads, make_moe(moe, swarm, hidden, i)) for i in range(layers)
        )
        self.ln = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        seq = ids.shape[1]
        x = self.tok(ids) + self.pos(torch.arange(seq, device=ids.device))
        causal = torch.ones(seq, seq, dtype=torch.bool, device=ids.device).triu(1)
        for block in self.blocks:
            x = block(x, causal)
        return self.head(self.ln(x))


def load_user_module(path: str) -> object:
    spec = importlib.util.spec_from_file_location(f"dmoe_user_model_{Path(path).stem}", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "build_model"):
        raise ValueError(f"{path} defines no build_model(swarm, dataset, options)")
    return module


def build_model(
    name: str,
    swarm: Swarm,
    dataset: Dataset,
    moe: MoEOptions,
    *,
    hidden: int,
    layers: int = 1,
    heads: int = 2,
    model_module: str | None = None,
    final_norm: bool = False,
) -> nn.Module:
    if model_module:
        return load_user_module(model_module).build_model(swarm, dataset, moe)  # type: ignore[attr-defined]
    if name == "mlp":
        if dataset.task != "classification":
            raise ValueError("the mlp model needs a classification dataset (digits, mnist)")
        return MoEMLP(
            dataset.input_dim, hidden, dataset.num_classes, layers, moe, swarm, final_norm
        )
    if name == "transformer":
        if dataset.task != "lm":
            raise ValueError("the transformer model needs a text dataset (--dataset text)")
        seq_len = int(dataset.train_x.shape[1])
        return MoETransformerLM(dataset.num_classes, seq_len, hidden, heads, layers, moe, swarm)
    raise ValueError(f"unknown model {name!r} (mlp, transformer, or --model-module)")


def aux_loss(model: nn.Module) -> torch.Tensor:
    """The sum of the load-balancing losses of the model's switch layers (0 if none)."""
    total = torch.zeros(())
    for module in model.modules():
        if isinstance(module, RemoteSwitchMixtureOfExperts):
            total = total + module.aux_loss
    return total


def experts_in_use(model: nn.Module) -> tuple[list[str], list[str]]:
    """The uids that answered the last forward, and those it called (answered or not)."""
    answered: set[str] = set()
    called: set[str] = set()
    for module in model.modules():
        if isinstance(module, RemoteMixtureOfExperts):
            answered |= module.experts_in_use
            called |= module.experts_called
    return sorted(answered), sorted(called)
