"""The language-model head: hidden states -> vocabulary logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LMHead(nn.Module):
    """``logits = hidden @ W.T`` with its own weight, or tied to an embedding table.

    Args:
        hidden_size: H.
        vocab_size: V.
        tied_embedding: if given, reuse its ``weight`` (V, H); the head then has
            no parameter of its own and writes no key to a checkpoint.
    """

    def __init__(self, hidden_size: int, vocab_size: int, tied_embedding: nn.Embedding | None = None):
        super().__init__()
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        self._tied: tuple[nn.Embedding, ...] = ()
        if tied_embedding is not None:
            if tuple(tied_embedding.weight.shape) != (vocab_size, hidden_size):
                raise ValueError(
                    f"tied embedding must have shape ({vocab_size}, {hidden_size}), "
                    f"found {tuple(tied_embedding.weight.shape)}"
                )
            self._tied = (tied_embedding,)
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
            nn.init.normal_(self.weight, std=0.02)

    @property
    def tied(self) -> bool:
        return bool(self._tied)

    def output_weight(self) -> torch.Tensor:
        """(V, H) weight used for the logits."""
        return self._tied[0].weight if self._tied else self.weight

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states (..., H) -> logits (..., V)."""
        return F.linear(hidden_states, self.output_weight())

    def extra_repr(self) -> str:
        return f"{self.hidden_size} -> {self.vocab_size}, tied={self.tied}"
