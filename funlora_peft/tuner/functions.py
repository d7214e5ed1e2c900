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

    def terms(self, a, b, num_functions):
        u = torch.stack([torch.roll(a, shifts=i, dims=-1) for i in range(num_functions)], dim=-1)
        v = torch.stack([torch.roll(b, shifts=i, dims=-1) for i in range(num_functions)], dim=-1)
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


FUNCTIONS: dict[str, FunctionFamily] = {
    family.name: family for family in (CosFamily(), RShiftFamily(), PowerFamily(), LinearFamily())
}


def get_function(name: str) -> FunctionFamily:
    """The function family called `name`; raises a ValueError listing the valid names on a typo."""
    if name not in FUNCTIONS:
        raise ValueError(f"Unknown `function` {name!r}: choose one of {sorted(FUNCTIONS)}.")
    return FUNCTIONS[name]
