"""Conditional convolution (Liu et al. 2021, after CondConv, Yang et al. 2019).

The kernel of every sample is a routing-weighted sum of a few expert kernels,
W(x, c) = sum_k r_k W_k with r = sigmoid(FC([global average of x, c])), so one network
serves both directions: c = +1 (inject the disease pattern) and c = -1 (remove it).
Per-sample kernels are applied as one grouped convolution over the batch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ConditionalConv3d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, n_experts: int = 3):
        super().__init__()
        if n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {n_experts}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride, self.padding, self.n_experts = stride, padding, n_experts
        k = kernel_size
        self.weight = nn.Parameter(torch.empty(n_experts, out_channels, in_channels, k, k, k))
        self.bias = nn.Parameter(torch.zeros(n_experts, out_channels))
        self.routing = nn.Linear(in_channels + 1, n_experts)  # [pooled features, c] -> expert weights
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for expert in self.weight:
            nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
        # routing weights start near 0.5 each: scale the experts so their sum starts at He scale
        with torch.no_grad():
            self.weight.mul_(2.0 / self.n_experts)
        nn.init.zeros_(self.routing.weight)
        nn.init.zeros_(self.routing.bias)

    def routing_weights(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """(B, n_experts) in (0, 1) from the input's channel means and the direction c."""
        pooled = x.mean(dim=(2, 3, 4))
        return torch.sigmoid(self.routing(torch.cat([pooled, c.to(x.dtype).view(-1, 1)], dim=1)))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        r = self.routing_weights(x, c)
        kernels = torch.einsum("be,eoidhw->boidhw", r, self.weight)
        kernels = kernels.reshape(batch * self.out_channels, self.in_channels, *self.weight.shape[3:])
        bias = (r @ self.bias).reshape(-1)
        out = F.conv3d(x.reshape(1, batch * self.in_channels, *x.shape[2:]), kernels, bias,
                       stride=self.stride, padding=self.padding, groups=batch)
        return out.reshape(batch, self.out_channels, *out.shape[2:])
