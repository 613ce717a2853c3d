"""The exact lean backward passes of :mod:`nnunet_tpp.models.lean`, as autograd functions and the mixins that route
a module through them.

* :class:`LeanConv`: a frozen convolution that keeps no copy of its input;
* :class:`LeanNormAct` / :class:`FoldedAct`: an instance norm whose following LeakyReLU is folded into it, keeping
  only its output;
* :func:`residual_join`: the end of a residual block (norm, residual sum, LeakyReLU), lean when its norm is marked.

Each decides at every call and falls back to the plain computation when gradients are not recorded or its own
parameters train. Which modules get them is decided by :func:`nnunet_tpp.models.lean.apply_memory_paths`; the
networks call :func:`residual_join` themselves, so this module knows no network.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _frozen(*params) -> bool:
    return not any(p is not None and p.requires_grad for p in params)


# --- lean frozen convolutions ---------------------------------------------------------------------------------
class _FrozenConvFunction(torch.autograd.Function):
    """A convolution with frozen weights that keeps no copy of its input for the backward pass.

    Under autocast the convolution runs as autocast runs it (in the autocast dtype, the caller's autocast state is
    in force inside ``forward``); only the weight (the parameter itself, no copy) is kept, and the backward casts it
    to the dtype the forward computed in.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        conv = F.conv3d if weight.dim() == 5 else F.conv2d
        out = conv(x, weight, bias, stride, padding, dilation, groups)
        ctx.save_for_backward(weight)
        ctx.geometry = (x.shape, x.stride(), x.dtype, stride, padding, dilation, groups, out.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, strides, in_dtype, stride, padding, dilation, groups, dtype = ctx.geometry
        grad = grad.to(dtype)
        # convolution_backward reads only the shape and layout of the input when its weight gradient is not
        # asked for; an uninitialised tensor of that layout stands in for it
        placeholder = torch.empty_strided(shape, strides, dtype=dtype, device=grad.device)
        n = weight.dim() - 2
        grad_input = torch.ops.aten.convolution_backward(
            grad, placeholder, weight.to(dtype), None, list(stride), list(padding), list(dilation), False, [0] * n,
            groups, [True, False, False])[0]
        return grad_input.to(in_dtype), None, None, None, None, None, None


class LeanConv:
    """Mixin for ``nn.Conv2d`` / ``nn.Conv3d`` (and the PEFT wrappers built on them): frozen weights, an input
    that needs a gradient and a recording autograd take :class:`_FrozenConvFunction`."""

    def _conv_forward(self, x, weight, bias):
        if (torch.is_grad_enabled() and x.requires_grad and _frozen(weight, bias)
                and self.padding_mode == "zeros" and not isinstance(self.padding, str)):
            return _FrozenConvFunction.apply(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return super()._conv_forward(x, weight, bias)


# --- lean norm + activation -----------------------------------------------------------------------------------
def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the lean norm computes its statistics and its backward in: float32 for half-precision inputs
    (autocast's float16 / bfloat16), the input's own dtype for float32 and float64."""
    return torch.promote_types(dtype, torch.float32)


class _NormActFunction(torch.autograd.Function):
    """``leaky_relu(instance_norm(x) [+ shortcut])`` keeping only its output (and the shortcut's input).

    The shortcut is ``residual`` itself or, when ``sc_weight`` is given, the frozen 1x1 projection
    ``conv(residual, sc_weight, sc_bias, sc_stride)``, recomputed in the backward pass instead of kept.

    Autocast (any device type): the statistics, the normalisation and the backward are computed in float32
    (:func:`statistics_dtype`), but the output, the one activation-sized tensor kept, has the dtype the plain path's
    output has (``x``'s, the dtype autocast gave the convolution before it, promoted with the shortcut's), so a
    half-precision network keeps half-precision tensors. The projection shortcut runs as autocast runs it in the
    forward pass and is recomputed in the same dtype in the backward pass.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, slope, sc_weight=None, sc_bias=None, sc_stride=1):
        n, c = x.shape[:2]
        compute = statistics_dtype(x.dtype)
        y, mean, rstd = torch.ops.aten.native_group_norm(
            x.to(compute), None if weight is None else weight.to(compute), None if bias is None else bias.to(compute),
            n, c, x[0, 0].numel(), c, eps)
        out_dtype, sc_dtype = x.dtype, None
        if residual is not None:
            shortcut = _shortcut(residual, sc_weight, sc_bias, sc_stride)  # under the caller's autocast, if any
            sc_dtype, out_dtype = shortcut.dtype, torch.promote_types(x.dtype, shortcut.dtype)
            y = y.add_(shortcut)
            del shortcut
        z = F.leaky_relu_(y, slope).to(out_dtype)
        del y
        inv, shift = _inverse_affine(weight, bias, n, c, mean)
        ctx.save_for_backward(z, mean, rstd, weight, residual, sc_weight, sc_bias, inv, shift)
        ctx.slope, ctx.sc_stride, ctx.has_bias = slope, sc_stride, bias is not None
        ctx.dtypes = (x.dtype, compute, sc_dtype, None if bias is None else bias.dtype)
        return z

    @staticmethod
    def backward(ctx, grad_z):
        z, mean, rstd, weight, residual, sc_weight, sc_bias, inv, shift = ctx.saved_tensors
        x_dtype, compute, sc_dtype, bias_dtype = ctx.dtypes
        slope = ctx.slope
        n, c = z.shape[:2]
        shape = (n, c) + (1,) * (z.dim() - 2)
        copied = z.dtype != compute  # a half-precision output is brought to float32 as a new tensor
        z = z.to(compute)
        grad_y = torch.ops.aten.leaky_relu_backward(grad_z.to(compute), z, slope, True)
        # the inverse of leaky_relu(., slope); in place only on the float32 copy, never on the kept tensor
        y = F.leaky_relu_(z, 1.0 / slope) if copied else F.leaky_relu(z, 1.0 / slope)
        del z
        if residual is not None:
            with torch.no_grad():  # the forward's shortcut, in the dtype the forward computed it in
                y = y.sub_(_shortcut(residual.to(sc_dtype), _cast(sc_weight, sc_dtype), _cast(sc_bias, sc_dtype),
                                     ctx.sc_stride))
        # y = x_hat * weight + bias with x_hat = (x - mean) * rstd. The norm's backward only needs x_hat, which is
        # recovered from y without the cancellation of rebuilding x; a channel whose weight is 0 gets no input
        # gradient, so its (unrecoverable) x_hat may be anything: 0. The native kernel is given x_hat itself with
        # mean 0 and rstd 1, and its input gradient is scaled by the true rstd afterwards.
        x_hat = torch.addcmul(shift.view(shape), y, inv.view(shape)) if shift is not None else y.mul_(inv.view(shape))
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                ctx.has_bias and ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.native_group_norm_backward(
            grad_y, x_hat, torch.zeros_like(mean), torch.ones_like(rstd), _cast(weight, compute), n, c,
            x_hat[0, 0].numel(), c, mask)
        del x_hat, y
        if gx is not None:
            gx = gx.mul_(rstd.view(shape)).to(x_dtype)
        if gw is not None:
            gw = gw.to(weight.dtype)
        if gb is not None:
            gb = gb.to(bias_dtype)
        grad_residual, nd = None, grad_y.dim() - 2
        if residual is not None and ctx.needs_input_grad[3]:
            if sc_weight is None:
                grad_residual = grad_y.to(residual.dtype)
            else:
                grad_residual = torch.ops.aten.convolution_backward(
                    grad_y.to(sc_dtype), residual.to(sc_dtype), sc_weight.to(sc_dtype), None,
                    list(_as_tuple(ctx.sc_stride, nd)), [0] * nd, [1] * nd, False, [0] * nd, 1,
                    [True, False, False])[0].to(residual.dtype)
        return gx, gw, gb, grad_residual, None, None, None, None, None


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _inverse_affine(weight, bias, n: int, c: int, like: torch.Tensor):
    """``(1 / weight, -bias / weight)`` per (sample, channel) for recovering the normalised values ``x_hat`` from the
    norm's output; 0 where the weight is 0 (those channels get no input gradient, so any ``x_hat`` does)."""
    w = weight.detach().view(1, c).to(like.dtype) if weight is not None else torch.ones(
        1, c, dtype=like.dtype, device=like.device)
    inv = torch.where(w != 0, 1.0 / w, torch.zeros_like(w)).expand(n, c)
    shift = (-bias.detach().view(1, c).to(like.dtype) * inv).expand(n, c) if bias is not None else None
    return inv.contiguous(), None if shift is None else shift.contiguous()


def _as_tuple(value, n: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def _shortcut(residual: torch.Tensor, sc_weight, sc_bias, sc_stride) -> torch.Tensor:
    if sc_weight is None:
        return residual
    conv = F.conv3d if sc_weight.dim() == 5 else F.conv2d
    return conv(residual, sc_weight, sc_bias, sc_stride)


def norm_fusable(norm: nn.Module) -> bool:
    """Instance norms (or group norms with one channel per group) without running statistics."""
    is_instance = isinstance(norm, nn.modules.instancenorm._InstanceNorm) and not norm.track_running_stats
    return is_instance or (isinstance(norm, nn.GroupNorm) and norm.num_groups == norm.num_channels)


def act_fusable(act: nn.Module | None) -> bool:
    """A LeakyReLU with a positive slope (invertible)."""
    return isinstance(act, nn.LeakyReLU) and act.negative_slope > 0


def _norm_params(norm: nn.Module):
    return getattr(norm, "weight", None), getattr(norm, "bias", None)


def _lean_norm_ok(norm: nn.Module, x: torch.Tensor) -> bool:
    weight, _ = _norm_params(norm)
    return torch.is_grad_enabled() and x.requires_grad and (weight is None or not weight.requires_grad)


class LeanNormAct:
    """Mixin for a norm whose following LeakyReLU was folded into it (that activation is now a pass-through)."""

    lean_slope: float

    def forward(self, x):
        if _lean_norm_ok(self, x):
            weight, bias = _norm_params(self)
            return _NormActFunction.apply(x, weight, bias, None, self.eps, self.lean_slope)
        return F.leaky_relu(super().forward(x), self.lean_slope)


class FoldedAct:
    """Mixin for an activation folded into the norm before it: returns its input unchanged."""

    def forward(self, x):
        return x


def residual_join(norm: nn.Module, act: nn.Module, x: torch.Tensor, block_input: torch.Tensor,
                  shortcut: nn.Module | None = None) -> torch.Tensor:
    """``act(norm(x) + shortcut(block_input))`` (identity shortcut when ``shortcut`` is None), the end of a
    residual block. Lean when the norm was marked ``lean_residual`` by
    :func:`nnunet_tpp.models.lean.apply_memory_paths`, its scale is frozen and gradients are recorded: only the
    output and the block input are kept, and a frozen 1x1 projection shortcut is recomputed in the backward pass."""
    weight, bias = _norm_params(norm)
    lean = (getattr(norm, "lean_residual", False) and act_fusable(act) and torch.is_grad_enabled()
            and (x.requires_grad or block_input.requires_grad) and (weight is None or not weight.requires_grad))
    if lean and shortcut is None:
        return _NormActFunction.apply(x, weight, bias, block_input, norm.eps, act.negative_slope)
    if (lean and isinstance(shortcut, (nn.Conv3d, nn.Conv2d)) and max(shortcut.kernel_size) == 1
            and shortcut.groups == 1 and _frozen(shortcut.weight, shortcut.bias) and not hasattr(shortcut, "adapter")
            and not hasattr(shortcut, "lora_A")):
        return _NormActFunction.apply(x, weight, bias, block_input, norm.eps, act.negative_slope, shortcut.weight,
                                      shortcut.bias, shortcut.stride)
    return act(norm(x) + (shortcut(block_input) if shortcut is not None else block_input))
