"""Training-only projector head: MLP ``in_dim -> hidden -> hidden -> out_dim`` with BatchNorm and GELU/ReLU.

The VISReg objective is applied to the projector's output; the backbone's features (the encoder's
CLS token) are what is released. The projector therefore lives in its own module, is saved only in
training checkpoints, and never enters ``model.safetensors``.
"""

from __future__ import annotations

import torch
from torch import nn

from visreg_hub.errors import UserInputError

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


class Projector(nn.Module):
    """MLP projector ``Linear-BN-act, Linear-BN-act, Linear`` (defaults 2048-2048-256, GELU).

    BatchNorm statistics are computed over all views together: a (V, N, in_dim) input is flattened to
    (V*N, in_dim) before the MLP, as the official VISReg code does (it concatenates the views along the
    batch). The views of one batch therefore share normalisation statistics.

    Args:
        in_dim: input width (the encoder's embedding dim).
        hidden_dim: width of the two hidden layers.
        out_dim: projection width D the loss sees.
        activation: ``"gelu"`` (paper default) or ``"relu"`` (the official small-data recipe).
        num_hidden_layers: hidden Linear-BN-act layers before the output Linear (2 in the paper).
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 2048,
        out_dim: int = 256,
        activation: str = "gelu",
        num_hidden_layers: int = 2,
    ) -> None:
        super().__init__()
        for arg_name, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserInputError(f"{arg_name} must be a positive integer, got {value!r}")
        if activation not in _ACTIVATIONS:
            raise UserInputError(
                f"activation={activation!r} is not supported; use one of {sorted(_ACTIVATIONS)}"
            )
        if num_hidden_layers < 1:
            raise UserInputError(f"num_hidden_layers must be >= 1, got {num_hidden_layers}")
        self.in_dim = in_dim
        self.hidden_dim = hidden_dim
        self.out_dim = out_dim
        self.activation = activation
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(num_hidden_layers):
            layers += [nn.Linear(width, hidden_dim), nn.BatchNorm1d(hidden_dim), _ACTIVATIONS[activation]()]
            width = hidden_dim
        layers.append(nn.Linear(width, out_dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Project features.

        Args:
            features: (N, in_dim) or (V, N, in_dim) (views stacked first).

        Returns:
            (N, out_dim) or (V, N, out_dim), matching the input's leading axes.
        """
        if features.ndim not in (2, 3) or features.shape[-1] != self.in_dim:
            raise UserInputError(
                f"Projector expects (N, {self.in_dim}) or (V, N, {self.in_dim}), got {tuple(features.shape)}"
            )
        leading = features.shape[:-1]
        projected = self.mlp(features.reshape(-1, self.in_dim))
        return projected.reshape(*leading, self.out_dim)

    def extra_repr(self) -> str:
        return f"{self.in_dim}->{self.hidden_dim}->{self.out_dim}, activation={self.activation}"
