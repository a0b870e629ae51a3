"""Today's feed-forward network: SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer"), as in Llama.

    SwiGLU(x) = W_down (SiLU(W_gate x) * (W_up x)),   SiLU(z) = z * sigmoid(z)

Three (d_model x d_ff) matrices and no biases, where the plain FFN of `course_lib.blocks.FeedForward`
has two matrices with biases. Llama picks d_ff close to 8/3 * d_model so that the three matrices
hold as many weights as a plain FFN's two with d_ff = 4 * d_model. `course_lib.cost.flops`'s
`feed_forward_params` and `feed_forward_flops` state both counts; notebook 06 checks them against
numel() and torch's FlopCounterMode. The normalisation that goes with it, RMSNorm, is torch's own `nn.RMSNorm`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from course_lib._validate import check_bool, check_positive_int

__all__ = ["SwiGLUFeedForward"]


class SwiGLUFeedForward(nn.Module):
    """Position-wise gated FFN: down_proj(SiLU(gate_proj(x)) * up_proj(x)), Llama's MLP.

    The names are Hugging Face's LlamaMLP's, so `from_hf_llama_mlp` copies weights one to one.
    """

    def __init__(self, d_model: int, d_ff: int, *, bias: bool = False) -> None:
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("d_ff", d_ff)
        check_bool("bias", bias)
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d_model) -> (..., d_model)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
        if x.ndim == 0 or x.shape[-1] != self.gate_proj.in_features:
            raise ValueError(f"x must have shape (..., d_model={self.gate_proj.in_features}); got {tuple(x.shape)}")
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (..., d_ff) gated -> (..., d_model)

    @classmethod
    def from_hf_llama_mlp(cls, mlp: Any) -> SwiGLUFeedForward:
        """A copy of a Hugging Face LlamaMLP (gate_proj, up_proj, down_proj; SiLU activation)."""
        names = ("gate_proj", "up_proj", "down_proj")
        if not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in names):
            raise TypeError(f"mlp must have nn.Linear gate_proj, up_proj and down_proj (a LlamaMLP); "
                            f"got {type(mlp).__name__}")
        act = getattr(mlp, "act_fn", None)
        if act is not None and not isinstance(act, nn.SiLU) and type(act).__name__ != "SiLUActivation":
            raise ValueError(f"mlp's activation must be SiLU for SwiGLU; got {type(act).__name__}")
        gate = mlp.gate_proj
        ours = cls(gate.in_features, gate.out_features, bias=gate.bias is not None)
        ours.to(device=gate.weight.device, dtype=gate.weight.dtype)
        ours.load_state_dict({f"{n}.{k}": v for n in names for k, v in getattr(mlp, n).state_dict().items()})
        return ours
