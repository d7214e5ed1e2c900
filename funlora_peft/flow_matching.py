"""Conditional flow matching (rectified-flow form): time sampling, the probability path, the loss and ODE sampling.

Time convention (the only one used in this package):

    x_0 ~ N(0, I)                  noise
    x_1 ~ p_data                   data
    t ~ U[0, 1]                    t = 0 is noise, t = 1 is data
    x_t = (1 - t) x_0 + t x_1      the probability path
    u_t = x_1 - x_0                the target velocity, d x_t / dt
    L_CFM = E_{t, x_0, x_1} || v_theta(x_t, t; y) - (x_1 - x_0) ||^2

The network receives the timestep `t * TIME_SCALE` (TIME_SCALE = 1000) so that the sinusoidal time embedding of a
diffusers `UNet2DModel` sees the same range as with diffusers' own schedulers.

diffusers' `FlowMatchEulerDiscreteScheduler` and `FlowMatchHeunDiscreteScheduler` write the same path the other way
round: sigma = 1 - t, x = (1 - sigma) x_data + sigma noise, scheduler timestep sigma * 1000 and model output
noise - x_data = -(x_1 - x_0). The two conventions meet ONLY in `sigma_to_t`, `t_to_sigma`, `velocity_to_scheduler`
and `scheduler_timestep_to_model_timestep`; a sampling loop over such a scheduler looks like::

    scheduler.set_timesteps(num_inference_steps)
    for timestep in scheduler.timesteps:
        model_timestep = scheduler_timestep_to_model_timestep(timestep)
        velocity = unet(x, model_timestep).sample
        x = scheduler.step(velocity_to_scheduler(velocity), timestep, x).prev_sample

Note that `FlowMatchEulerDiscreteScheduler.set_timesteps(n)` does NOT use the uniform grid of `sample_ode`: its
sigmas are `linspace(1, 1 / num_train_timesteps, n)` followed by a final 0, i.e. n - 1 equal steps from t = 0 to
t = 0.999 and one last tiny step of 0.001 to t = 1. Pass `time_grid=sigma_to_t(scheduler.sigmas)` to `sample_ode` to
reproduce a scheduler's run exactly, or `scheduler.set_timesteps(sigmas=t_to_sigma(uniform_time_grid(n))[:-1])` to
make the scheduler use the uniform grid.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

TIME_SCALE = 1000.0
"""Factor between the flow time t in [0, 1] and the timestep passed to the network."""

TIME_DISTRIBUTIONS = ("uniform", "logit_normal")
ODE_METHODS = ("euler", "heun")
LOSS_REDUCTIONS = ("mean", "sum", "none")

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------------------------------
# The boundary with diffusers' sigma convention
# --------------------------------------------------------------------------------------------------------------------


def sigma_to_t(sigma: torch.Tensor | float) -> torch.Tensor | float:
    """Convert a diffusers flow-matching noise level sigma to our flow time t: t = 1 - sigma.

    One of the only places where our convention (t = 0 noise, t = 1 data) meets diffusers' (sigma = 1 noise,
    sigma = 0 data). Works elementwise on tensors of any shape.

    Example:
        >>> sigma_to_t(torch.tensor([1.0, 0.25, 0.0]))
        tensor([0.0000, 0.7500, 1.0000])
    """
    return 1.0 - sigma


def t_to_sigma(t: torch.Tensor | float) -> torch.Tensor | float:
    """Convert our flow time t to a diffusers flow-matching noise level sigma: sigma = 1 - t.

    One of the only places where our convention meets diffusers'. Works elementwise on tensors of any shape.

    Example:
        >>> t_to_sigma(torch.tensor([0.0, 0.75, 1.0]))
        tensor([1.0000, 0.2500, 0.0000])
    """
    return 1.0 - t


def velocity_to_scheduler(velocity: torch.Tensor) -> torch.Tensor:
    """Convert our velocity x_1 - x_0 to the model output diffusers' flow-matching schedulers expect: noise - data.

    v_sched = d x / d sigma = -(d x_t / dt) = -(x_1 - x_0). One of the only places where our convention meets
    diffusers'; the conversion is its own inverse.

    Args:
        velocity: our velocity, any shape, e.g. `(batch, channels, height, width)`.

    Returns:
        `-velocity`, same shape, to pass to `scheduler.step`.

    Example:
        >>> x = scheduler.step(velocity_to_scheduler(unet(x, model_timestep).sample), timestep, x).prev_sample
    """
    return -velocity


def t_to_model_timestep(t: torch.Tensor | float) -> torch.Tensor | float:
    """The timestep the network receives for flow time t: `t * TIME_SCALE`, in [0, 1000].

    Example:
        >>> prediction = unet(batch.x_t, t_to_model_timestep(batch.t)).sample
    """
    return t * TIME_SCALE


def scheduler_timestep_to_model_timestep(
    timestep: torch.Tensor | float, num_train_timesteps: float = TIME_SCALE
) -> torch.Tensor | float:
    """Convert a diffusers flow-matching scheduler timestep (sigma * num_train_timesteps) to our network timestep.

    model timestep = (1 - sigma) * TIME_SCALE, with sigma = timestep / num_train_timesteps; with the default
    `num_train_timesteps = 1000` this is `1000 - timestep`. One of the only places where our convention meets
    diffusers'.

    Args:
        timestep: an element of `scheduler.timesteps` (scalar or tensor of any shape).
        num_train_timesteps: the scheduler's `config.num_train_timesteps`.

    Example:
        >>> for timestep in scheduler.timesteps:
        ...     velocity = unet(x, scheduler_timestep_to_model_timestep(timestep)).sample
        ...     x = scheduler.step(velocity_to_scheduler(velocity), timestep, x).prev_sample
    """
    return t_to_model_timestep(sigma_to_t(timestep / num_train_timesteps))


# --------------------------------------------------------------------------------------------------------------------
# Training: times, the path, the target and the loss
# --------------------------------------------------------------------------------------------------------------------


def sample_time(
    batch_size: int,
    *,
    distribution: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw flow times t in [0, 1] for a training batch.

    - `"uniform"`: t ~ U[0, 1].
    - `"logit_normal"`: t = sigmoid(n), n ~ N(logit_mean, logit_std^2) (SD3's logit-normal sampling; it puts more
      weight on intermediate times). This is what `diffusers.training_utils.compute_density_for_timestep_sampling`
      draws, but diffusers' training scripts use the draw as sigma = 1 - t: their `logit_mean` m is our `-m`.

    Args:
        batch_size: number of times to draw.
        distribution: `"uniform"` or `"logit_normal"`.
        logit_mean: mean of the normal before the sigmoid (`"logit_normal"` only).
        logit_std: standard deviation of the normal before the sigmoid (`"logit_normal"` only).
        generator: optional random generator, on `device`.
        device: device of the result.

    Returns:
        t of shape `(batch,)`, float32.

    Example:
        >>> t = sample_time(8, distribution="logit_normal", generator=torch.Generator().manual_seed(0))
    """
    if distribution not in TIME_DISTRIBUTIONS:
        raise ValueError(
            f"`distribution` must be one of {list(TIME_DISTRIBUTIONS)}, got {distribution!r}: "
            "pick one of the valid choices."
        )
    if distribution == "uniform":
        return torch.rand(batch_size, generator=generator, device=device)
    if logit_std <= 0:
        raise ValueError(f"`logit_std` must be > 0 for `distribution='logit_normal'`, got {logit_std}.")
    normal = torch.randn(batch_size, generator=generator, device=device)
    return torch.sigmoid(logit_mean + logit_std * normal)


def _expand_time(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Broadcast t of shape `(batch,)` (or a scalar) to `(batch, 1, ..., 1)` matching `like`, in `like`'s dtype."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(
            f"`t` must be a scalar or of shape (batch,) = ({like.shape[0]},), got shape {tuple(t.shape)}."
        )
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def interpolate(x_0: torch.Tensor, x_1: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """Point x_t on the straight path from noise x_0 to data x_1: x_t = (1 - t) x_0 + t x_1.

    Args:
        x_0: noise, shape `(batch, *dims)`, e.g. `(batch, channels, height, width)`.
        x_1: data, same shape as `x_0`.
        t: flow times of shape `(batch,)` (or a scalar), broadcast over the other dimensions.

    Returns:
        x_t, same shape and dtype as `x_1`. It equals x_0 at t = 0 and x_1 at t = 1 exactly.

    Example:
        >>> x_t = interpolate(torch.randn_like(images), images, sample_time(images.shape[0]))
    """
    if x_0.shape != x_1.shape:
        raise ValueError(f"`x_0` and `x_1` must have the same shape, got {tuple(x_0.shape)} and {tuple(x_1.shape)}.")
    t = _expand_time(t, x_1)
    # This form (not x_0 + t (x_1 - x_0)) hits both endpoints exactly in floating point.
    return (1 - t) * x_0 + t * x_1


def target_velocity(x_0: torch.Tensor, x_1: torch.Tensor) -> torch.Tensor:
    """Target velocity of the straight path: u_t = d x_t / dt = x_1 - x_0 (independent of t).

    Args:
        x_0: noise, shape `(batch, *dims)`.
        x_1: data, same shape.

    Returns:
        x_1 - x_0, same shape.

    Example:
        >>> loss = flow_matching_loss(prediction, target_velocity(x_0, x_1))
    """
    if x_0.shape != x_1.shape:
        raise ValueError(f"`x_0` and `x_1` must have the same shape, got {tuple(x_0.shape)} and {tuple(x_1.shape)}.")
    return x_1 - x_0


@dataclass
class FlowMatchingBatch:
    """One conditional-flow-matching training batch; every tensor but `t` has shape `(batch, *dims)`.

    Attributes:
        x_0: noise, x_0 ~ N(0, I).
        x_1: data.
        t: flow times, shape `(batch,)`, float32; the network gets `t_to_model_timestep(t)`.
        x_t: network input, (1 - t) x_0 + t x_1.
        velocity: regression target, x_1 - x_0.
    """

    x_0: torch.Tensor
    x_1: torch.Tensor
    t: torch.Tensor
    x_t: torch.Tensor
    velocity: torch.Tensor


def make_flow_matching_batch(
    x_1: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    time_distribution: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> FlowMatchingBatch:
    """Draw noise x_0 ~ N(0, I) and times t for a data batch x_1 and build the path point and target.

    Args:
        x_1: data, shape `(batch, *dims)`, e.g. `(batch, channels, height, width)`.
        generator: optional random generator on `x_1`'s device; it draws t first, then x_0.
        time_distribution: `"uniform"` or `"logit_normal"`, see `sample_time`.
        logit_mean: see `sample_time`.
        logit_std: see `sample_time`.

    Returns:
        A `FlowMatchingBatch` with x_t = (1 - t) x_0 + t x_1 and velocity = x_1 - x_0.

    Example:
        >>> batch = make_flow_matching_batch(images)
        >>> prediction = unet(batch.x_t, t_to_model_timestep(batch.t)).sample
        >>> loss = flow_matching_loss(prediction, batch.velocity)
    """
    t = sample_time(
        x_1.shape[0],
        distribution=time_distribution,
        logit_mean=logit_mean,
        logit_std=logit_std,
        generator=generator,
        device=x_1.device,
    )
    x_0 = torch.randn(x_1.shape, generator=generator, device=x_1.device, dtype=x_1.dtype)
    return FlowMatchingBatch(x_0=x_0, x_1=x_1, t=t, x_t=interpolate(x_0, x_1, t), velocity=target_velocity(x_0, x_1))


def flow_matching_loss(prediction: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Conditional flow-matching loss, the mean squared error between predicted and target velocity.

    L_CFM = E_{t, x_0, x_1} || v_theta(x_t, t; y) - (x_1 - x_0) ||^2, estimated per element: the squared norm is
    divided by the number of elements per sample (a constant factor that keeps the scale independent of resolution).

    Args:
        prediction: v_theta(x_t, t; y), shape `(batch, *dims)`.
        target: x_1 - x_0, same shape (no broadcasting, to catch shape bugs).
        reduction: `"mean"` (scalar, mean over all elements), `"sum"` (scalar, sum of the per-sample losses) or
            `"none"` (per-sample losses, shape `(batch,)`, each the mean over that sample's elements).

    Returns:
        The loss, computed in float32 at least.

    Example:
        >>> loss = flow_matching_loss(unet(batch.x_t, t_to_model_timestep(batch.t)).sample, batch.velocity)
    """
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {list(LOSS_REDUCTIONS)}, got {reduction!r}.")
    if prediction.shape != target.shape:
        raise ValueError(
            f"`prediction` and `target` must have the same shape, got {tuple(prediction.shape)} and "
            f"{tuple(target.shape)}."
        )
    # Low-precision squares and sums lose the small late-training losses: accumulate in float32 at least.
    dtype = torch.promote_types(prediction.dtype, torch.float32)
    squared_error = (prediction.to(dtype) - target.to(dtype)) ** 2
    if reduction == "mean":
        return squared_error.mean()
    per_sample = squared_error.reshape(squared_error.shape[0], -1).mean(dim=1)
    return per_sample.sum() if reduction == "sum" else per_sample


# --------------------------------------------------------------------------------------------------------------------
# Sampling: integrate d x_t / dt = v(x_t, t) from t = 0 (noise) to t = 1 (data)
# --------------------------------------------------------------------------------------------------------------------


def uniform_time_grid(
    num_steps: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The default time grid of `sample_ode`: `linspace(0, 1, num_steps + 1)`, shape `(num_steps + 1,)`.

    Example:
        >>> uniform_time_grid(4)
        tensor([0.0000, 0.2500, 0.5000, 0.7500, 1.0000])
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"`num_steps` must be an integer >= 1, got {num_steps!r}.")
    return torch.linspace(0.0, 1.0, num_steps + 1, device=device, dtype=dtype)


def shift_sigma(sigma: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """The timestep shift of diffusers' `FlowMatchEulerDiscreteScheduler(shift=...)`: sigma -> s sigma / (1 + (s - 1)
    sigma).

    It keeps sigma = 0 and 1 and, for s > 1, raises every sigma in between: a grid uniform in sigma then spends more of
    its steps near the noise, where the coarse layout of an image is decided, and takes longer ones near the data.
    s = 1 is the identity.

    Example:
        >>> shift_sigma(torch.tensor([1.0, 0.5, 0.1, 0.0]), 3.0)
        tensor([1.0000, 0.7500, 0.2500, 0.0000])
    """
    check_shift(shift)
    return shift * sigma / (1 + (shift - 1) * sigma)


def check_shift(shift: float, name: str = "`shift`") -> None:
    """Raise a `ValueError` naming `name` unless `shift` is a finite number > 0 (1: no shift)."""
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0 or shift == float("inf"):
        raise ValueError(f"{name} must be a number > 0 (1: no shift), got {shift!r}.")


def shifted_time_grid(
    num_steps: int, shift: float = 1.0, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """`uniform_time_grid(num_steps)` under the timestep shift `shift_sigma(., shift)`, shape `(num_steps + 1,)`.

    The grid `FunLoRAPipeline` integrates with a `FlowMatchEulerDiscreteScheduler(shift=shift)`: pass it to
    `sample_ode(..., time_grid=...)` to draw the same samples without a pipeline. `shift=1` gives the uniform grid
    itself.

    Example:
        >>> shifted_time_grid(4, 3.0)
        tensor([0.0000, 0.1000, 0.2500, 0.5000, 1.0000])
    """
    check_shift(shift)
    grid = uniform_time_grid(num_steps, device=device, dtype=dtype)
    if shift == 1:  # exactly the uniform grid (1 - (1 - t) need not round back to t)
        return grid
    return sigma_to_t(shift_sigma(t_to_sigma(grid), shift))


def num_function_evaluations(num_steps: int, method: str = "euler") -> int:
    """Number of velocity evaluations (NFE) `sample_ode` makes: `num_steps` (Euler) or `2 * num_steps - 1` (Heun)."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"`num_steps` must be an integer >= 1, got {num_steps!r}.")
    if method not in ODE_METHODS:
        raise ValueError(f"`method` must be one of {list(ODE_METHODS)}, got {method!r}.")
    return num_steps if method == "euler" else 2 * num_steps - 1


@torch.no_grad()
def sample_ode(
    velocity_fn: VelocityFn,
    x_0: torch.Tensor,
    num_steps: int,
    method: str = "euler",
    *,
    time_grid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integrate the flow ODE d x_t / dt = v(x_t, t) from noise (t = 0) to data (t = 1) with fixed steps.

    On the grid 0 = t_0 < t_1 < ... < t_N = 1 (N = `num_steps`, uniform unless `time_grid` is given), with
    h_k = t_{k+1} - t_k:

    - Euler: x_{k+1} = x_k + h_k v(x_k, t_k). NFE = N.
    - Heun: x' = x_k + h_k v(x_k, t_k), x_{k+1} = x_k + h_k / 2 (v(x_k, t_k) + v(x', t_{k+1})), except the last step,
      which is an Euler step (the field need not be defined at t = 1, and diffusers' `FlowMatchHeunDiscreteScheduler`
      does the same). NFE = 2 N - 1.

    Args:
        velocity_fn: `velocity_fn(x_t, t)` with x_t of shape `(batch, *dims)` and t of shape `(batch,)` in [0, 1]
            (NOT multiplied by `TIME_SCALE`), returning the velocity, shape `(batch, *dims)`.
        x_0: initial noise, shape `(batch, *dims)`, e.g. `(batch, channels, height, width)`.
        num_steps: number of steps N >= 1.
        method: `"euler"` or `"heun"`.
        time_grid: optional increasing times of shape `(num_steps + 1,)` in [0, 1], e.g.
            `sigma_to_t(scheduler.sigmas)` to reproduce a diffusers `FlowMatchEulerDiscreteScheduler` run.

    Returns:
        x_1, the samples, same shape and dtype as `x_0`.

    Example:
        >>> def velocity_fn(x_t, t):
        ...     return unet(x_t, t_to_model_timestep(t)).sample
        >>> images = sample_ode(velocity_fn, torch.randn(4, 3, 32, 32), num_steps=50, method="heun")
    """
    if method not in ODE_METHODS:
        raise ValueError(f"`method` must be one of {list(ODE_METHODS)}, got {method!r}.")
    if time_grid is None:
        time_grid = uniform_time_grid(num_steps, device=x_0.device)
    else:
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"`num_steps` must be an integer >= 1, got {num_steps!r}.")
        time_grid = torch.as_tensor(time_grid, device=x_0.device)
        if time_grid.shape != (num_steps + 1,):
            raise ValueError(
                f"`time_grid` must have shape (num_steps + 1,) = ({num_steps + 1},), got {tuple(time_grid.shape)}."
            )
        if (time_grid.diff() <= 0).any() or time_grid[0] < 0 or time_grid[-1] > 1:
            raise ValueError(f"`time_grid` must increase strictly within [0, 1], got {time_grid.tolist()}.")
    # The state is integrated in float32 at least, as diffusers' schedulers do, so that half-precision models do not
    # accumulate rounding error over many steps.
    dtype = torch.promote_types(x_0.dtype, torch.float32)
    time_grid = time_grid.to(dtype)
    batch_size = x_0.shape[0]
    x = x_0.to(dtype)

    def velocity(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return velocity_fn(x_t.to(x_0.dtype), t.expand(batch_size)).to(dtype)

    for k in range(num_steps):
        t, t_next = time_grid[k], time_grid[k + 1]
        h = t_next - t
        v = velocity(x, t)
        x_euler = x + h * v
        if method == "heun" and k < num_steps - 1:
            x = x + 0.5 * h * (v + velocity(x_euler, t_next))
        else:
            x = x_euler
    return x.to(x_0.dtype)
