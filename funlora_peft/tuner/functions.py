"""The functional transforms that raise the rank of FunLoRA's rank-1 factors.

For a class `y` with factors `a` (out_channels) and `b` (in_channels), mixing weights `alpha` (p) and, for `cos`,
frequencies `omega` (p), every family computes the functional matrix

    F_y = (1/p) * sum_{i=1..p} alpha_i * f_i(a, b)                      (out_channels, in_channels)

| name     | f_i(a, b), i = 1..p                             | rank of F_y                          |
|----------|-------------------------------------------------|--------------------------------------|
| `cos`    | cos(omega_i * a b^T), elementwise               | high (grows with omega, spread of a b) |
| `rshift` | roll(a, i-1) roll(b, i-1)^T                     | exactly p generically                |
| `power`  | tanh(a)^i (tanh(b)^i)^T = (tanh(a) tanh(b)^T)^i | <= p, numerically ~3-5               |
| `linear` | a b^T (p = 1)                                   | 1                                    |

`power` passes the factors through tanh before raising them to the i-th power: the plain (a b^T)^i with p = 10
overflows within a few hundred steps at adapter learning rates, while |tanh(a) tanh(b)^T| <= 1 keeps every power
bounded by 1 and F_y bounded by mean_i |alpha_i|. Every family works on a batch of classes at once: the inputs carry a
leading `classes` dimension.
"""

from __future__ import annotations

import torch


class FunctionFamily:
    """A family of functions f_1..f_p; subclasses implement `terms` or override `compute`."""

    name: str = ""
    uses_omega: bool = False
    separable: bool = True
    rank_note: str = ""

    def num_parameters(self, out_channels: int, in_channels: int, num_functions: int) -> int:
        """Number of adapter parameters per class for one layer: out + in + p (+ p for omega)."""
        return out_channels + in_channels + num_functions * (2 if self.uses_omega else 1)

    def terms(self, a: torch.Tensor, b: torch.Tensor, num_functions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The separable factors u_i, v_i with f_i(a, b) = u_i v_i^T.

        Args:
            a: `(classes, out_channels)`.
            b: `(classes, in_channels)`.

        Returns:
            `u` of shape `(classes, out_channels, p)` and `v` of shape `(classes, in_channels, p)`.
        """
        raise NotImplementedError

    def compute(
        self, a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor, omega: torch.Tensor | None = None
    ) -> torch.Tensor:
        """F_y = (1/p) sum_i alpha_i f_i(a, b) for a batch of classes.

        Args:
            a: `(classes, out_channels)`.
            b: `(classes, in_channels)`.
            alpha: `(classes, p)`.
            omega: `(classes, p)`, only for families with `uses_omega`.

        Returns:
            `(classes, out_channels, in_channels)`.
        """
        num_functions = alpha.shape[-1]
        u, v = self.terms(a, b, num_functions)
        # sum_i (alpha_i / p) u_i v_i^T as one batched matmul: (classes, out, p) @ (classes, p, in)
        return torch.matmul(u * (alpha / num_functions).unsqueeze(1), v.transpose(1, 2))

    def scales(
        self, a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor, omega: torch.Tensor | None = None
    ) -> torch.Tensor:
        """1 + F_y for a batch of classes, `(classes, out_channels, in_channels)`: the layer's hot path.

        The same values as `1 + compute(...)` in fewer ops (one `baddbmm` adds the 1 and sums the p terms).
        """
        num_functions = alpha.shape[-1]
        u, v = self.terms(a, b, num_functions)
        weighted = u * alpha.view(alpha.shape[0], 1, num_functions)
        return torch.baddbmm(_one(a), weighted, v.transpose(1, 2), alpha=1.0 / num_functions)


_ONES: dict[tuple, torch.Tensor] = {}


def _one(like: torch.Tensor) -> torch.Tensor:
    """A 0-dim tensor 1 on `like`'s device and dtype, made once (the constant term of 1 + F)."""
    key = (like.device, like.dtype)
    if key not in _ONES:
        _ONES[key] = torch.ones((), device=like.device, dtype=like.dtype)
    return _ONES[key]


class LinearFamily(FunctionFamily):
    """f_1(a, b) = a b^T: a plain rank-1 modulation, the LoRA-style baseline."""

    name = "linear"
    rank_note = "1"

    def terms(self, a, b, num_functions):
        return a.unsqueeze(-1), b.unsqueeze(-1)


class RShiftFamily(FunctionFamily):
    """f_i(a, b) = roll(a, i-1) roll(b, i-1)^T: both factors circularly shifted by i - 1."""

    name = "rshift"
    rank_note = "exactly p generically"

    def __init__(self) -> None:
        self._shifts: dict[tuple, torch.Tensor] = {}

    def _shift_index(self, size: int, num_functions: int, device: torch.device) -> torch.Tensor:
        """`(size, p)` index `[o, i] = (o - i) mod size`: `v[..., index][..., o, i] = roll(v, i)[..., o]`."""
        key = (size, num_functions, device)
        if key not in self._shifts:
            index = (torch.arange(size)[:, None] - torch.arange(num_functions)[None, :]) % size
            self._shifts[key] = index.to(device)
        return self._shifts[key]

    def terms(self, a, b, num_functions):
        # One gather per factor rather than p rolls and a stack.
        u = a[:, self._shift_index(a.shape[-1], num_functions, a.device)]
        v = b[:, self._shift_index(b.shape[-1], num_functions, b.device)]
        return u, v


class PowerFamily(FunctionFamily):
    """f_i(a, b) = (tanh(a) tanh(b)^T)^i elementwise = tanh(a)^i (tanh(b)^i)^T; bounded by 1 in absolute value."""

    name = "power"
    rank_note = "<= p, numerically about 3 to 5"

    def terms(self, a, b, num_functions):
        exponents = torch.arange(1, num_functions + 1, device=a.device, dtype=a.dtype)
        u = torch.tanh(a).unsqueeze(-1).pow(exponents)
        v = torch.tanh(b).unsqueeze(-1).pow(exponents)
        return u, v


class _CosScales(torch.autograd.Function):
    """1 + F with F = (1/p) sum_i alpha_i cos(omega_i a b^T), for a batch of classes, in few batched ops and without
    keeping the `(classes, p, out, in)` phases for backward: they are recomputed from a, b and omega, so a layer's
    training memory stays at its factors.
    """

    @staticmethod
    def forward(ctx, a, b, alpha, omega):
        (classes, out_channels), in_channels, num_functions = a.shape, b.shape[1], alpha.shape[1]
        outer = torch.bmm(a.view(classes, out_channels, 1), b.view(classes, 1, in_channels))
        # (classes, p, out * in): the phases omega_i a_o b_j, then their cosines, in place
        cosines = (outer.view(classes, 1, -1) * omega.view(classes, num_functions, 1)).cos_()
        ctx.save_for_backward(a, b, alpha, omega)
        # 1 + sum_i (alpha_i / p) cos_i as one batched matmul: (classes, 1, p) @ (classes, p, out * in)
        scales = torch.baddbmm(_one(a), alpha.view(classes, 1, num_functions), cosines, alpha=1.0 / num_functions)
        return scales.view(classes, out_channels, in_channels)

    @staticmethod
    def backward(ctx, grad):
        a, b, alpha, omega = ctx.saved_tensors
        (classes, out_channels), in_channels, num_functions = a.shape, b.shape[1], alpha.shape[1]
        grad = grad.to(a.dtype).reshape(classes, 1, out_channels * in_channels)
        outer = torch.bmm(a.view(classes, out_channels, 1), b.view(classes, 1, in_channels)).view(classes, 1, -1)
        phases = outer * omega.view(classes, num_functions, 1)  # (classes, p, out * in)
        grad_alpha = torch.bmm(phases.cos(), grad.transpose(1, 2)).view(classes, num_functions) / num_functions
        # d(1 + F) / d phase_i = -(alpha_i / p) sin(phase_i)
        grad_phases = phases.sin_().mul_(grad).mul_(alpha.view(classes, num_functions, 1) / -num_functions)
        grad_omega = torch.bmm(grad_phases, outer.transpose(1, 2)).view(classes, num_functions)
        grad_outer = torch.bmm(omega.view(classes, 1, num_functions), grad_phases).view(
            classes, out_channels, in_channels
        )
        grad_a = torch.bmm(grad_outer, b.view(classes, in_channels, 1)).view(classes, out_channels)
        grad_b = torch.bmm(a.view(classes, 1, out_channels), grad_outer).view(classes, in_channels)
        return grad_a, grad_b, grad_alpha, grad_omega


class CosFamily(FunctionFamily):
    """f_i(a, b) = cos(omega_i * a b^T) elementwise, with learned frequencies omega; dense, not separable."""

    name = "cos"
    uses_omega = True
    separable = False
    rank_note = "high: grows with omega and the spread of a, b"

    def compute(self, a, b, alpha, omega=None):
        if omega is None:
            raise ValueError("function 'cos' needs the frequencies `omega` of shape (classes, p).")
        num_functions = alpha.shape[-1]
        outer = a.unsqueeze(-1) * b.unsqueeze(-2)  # (classes, out, in)
        phases = omega[:, :, None, None] * outer.unsqueeze(1)  # (classes, p, out, in)
        return torch.einsum("cp,cpoi->coi", alpha / num_functions, torch.cos(phases))

    def scales(self, a, b, alpha, omega=None):
        if omega is None:
            raise ValueError("function 'cos' needs the frequencies `omega` of shape (classes, p).")
        return _CosScales.apply(a, b, alpha, omega)


FUNCTIONS: dict[str, FunctionFamily] = {
    family.name: family for family in (CosFamily(), RShiftFamily(), PowerFamily(), LinearFamily())
}


def get_function(name: str) -> FunctionFamily:
    """The function family called `name`; raises a ValueError listing the valid names on a typo."""
    if name not in FUNCTIONS:
        raise ValueError(f"Unknown `function` {name!r}: choose one of {sorted(FUNCTIONS)}.")
    return FUNCTIONS[name]
