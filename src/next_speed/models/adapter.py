"""The plan adapter of CODE_MODE=inject: a code tuple as one vector in the decoder's hidden space."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PlanAdapter(nn.Module):
    """Code tuple -> one vector in the decoder's hidden space.

    Each level's RVQ codeword (frozen, from step 03) is scaled to unit RMS (deeper levels have
    smaller codewords but carry as much identity), the K of them are concatenated and mapped by
    a two-layer MLP. The output layer starts at zero, so the untrained adapter adds nothing.
    `scale` is the RMS of the residual stream where the vector is added, so the learned output
    is in units of the stream's own size. Dropped levels (`keep` False) enter as zeros.
    """

    def __init__(self, *, codebooks, hidden: int, width: int = 512, scale: float = 1.0):
        super().__init__()
        cb = torch.as_tensor(codebooks, dtype=torch.float32)  # (K, V, D)
        self.K, self.V, self.D = cb.shape
        self.register_buffer("codebooks", cb / cb.pow(2).mean((1, 2), keepdim=True).sqrt().clamp(min=1e-8))
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.inp = nn.Linear(self.K * self.D, width)
        self.out = nn.Linear(width, hidden)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, codes, keep=None):
        """codes (B, K) long, keep (B, K) bool or None -> (B, hidden)."""
        x = self.codebooks[torch.arange(self.K, device=codes.device), codes]  # (B, K, D)
        if keep is not None:
            x = x * keep[..., None].to(x.dtype)
        return self.out(F.gelu(self.inp(x.flatten(1)))) * self.scale  # (B, hidden)
