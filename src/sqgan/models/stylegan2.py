"""StyleGAN2 (Karras et al., "Analyzing and Improving the Image Quality of StyleGAN", CVPR 2020), config F, in pure
PyTorch: no custom CUDA ops, so it runs on the CPU and on any GPU.

Semantics follow NVlabs/stylegan2-ada-pytorch `training/networks.py` (Karras et al., NeurIPS 2020) and its reference
(non-CUDA) `upfirdn2d` / `conv2d_resample` paths:
  - G = `MappingNetwork` (z → w, 8 FC layers at lr × 0.01, running mean `w_avg` for truncation) and
    `SynthesisNetwork` (4×4 constant → per resolution a modulated 3×3 conv with 2× upsampling and a modulated 3×3
    conv, each with per-pixel noise and a learned noise strength; "skip" output: a toRGB at every resolution, the
    running image upsampled and summed). The output is linear (not squashed), as in StyleGAN2.
  - D = `DiscriminatorTrunk` ("resnet": fromRGB, then per resolution conv 3×3, conv 3×3 ↓2 and a 1×1 ↓2 skip summed
    with gain √½) and its head (minibatch stddev, conv 3×3, FC → features, FC → logit).
  - Equalised learning rate (Karras et al. 2018, §4.1): weights are stored N(0, 1) (N(0, 1/lr_mul) for the mapping)
    and scaled at run time by lr_mul/√fan_in, so Adam's step is the same relative size for every layer.

Resampling uses the separable [1, 3, 3, 1] FIR filter (Zhang 2019, "Making convolutional networks shift-invariant
again"). An "up" layer is, as stylegan2-ada's `conv2d_resample`, a stride-2 transposed (grouped) conv followed by the
FIR blur with gain 4; this equals zero-insertion upsampling + blur + 3×3 conv up to the border pixels, at a quarter of
the conv cost. Down layers blur then convolve with stride 2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SQRT2 = math.sqrt(2.0)
RESOLUTIONS = tuple(2**i for i in range(5, 11))  # 32 … 1024


def check_resolution(resolution: int) -> int:
    """log2(resolution); ValueError unless it is a power of two in 32…1024."""
    if resolution not in RESOLUTIONS:
        allowed = ", ".join(str(r) for r in RESOLUTIONS)
        raise ValueError(f"StyleGAN2 supports resolutions that are powers of two from 32 to 1024 ({allowed}), "
                         f"got {resolution}")
    return int(math.log2(resolution))


def channels_at(resolution: int, channel_base: int, channel_max: int) -> int:
    """Feature maps at a resolution: min(channel_base // r, channel_max) (stylegan2-ada's channels_dict)."""
    ch = min(channel_base // resolution, channel_max)
    if ch < 1:
        raise ValueError(f"channel_base {channel_base} gives no channels at {resolution}px (need channel_base ≥ "
                         f"resolution)")
    return ch


# ---------------------------------------------------------------------------------------------------------------------
# Pure-torch versions of stylegan2-ada's bias_act, upfirdn2d and conv2d_resample.


def bias_act(x: torch.Tensor, b: torch.Tensor | None, act: str = "linear", gain: float = 1.0,
             clamp: float | None = None) -> torch.Tensor:
    """x + b (over dim 1), then leaky ReLU 0.2 ("lrelu") or identity ("linear"), × gain, clamped to ±clamp."""
    if b is not None:
        x = x + b.to(x.dtype).reshape([1, -1] + [1] * (x.dim() - 2))
    if act == "lrelu":
        x = F.leaky_relu(x, 0.2)
    elif act != "linear":
        raise ValueError(f"activation must be 'lrelu' or 'linear', got {act!r}")
    if gain != 1:
        x = x * gain
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    return x


def fir_filter(taps: list[float] | tuple[float, ...] = (1, 3, 3, 1)) -> torch.Tensor:
    """The 1-D factor of a separable FIR filter, normalised so that the 2-D filter (its outer product) sums to 1."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    return f / f.sum()


def upfirdn2d(x: torch.Tensor, f: torch.Tensor, up: int = 1, down: int = 1,
              padding: tuple[int, int, int, int] = (0, 0, 0, 0), gain: float = 1.0) -> torch.Tensor:
    """Upsample by zero insertion, pad (negative crops), convolve with the separable filter f ⊗ f (`f` [taps]), keep
    every `down`-th pixel (stylegan2-ada's `_upfirdn2d_ref`). `padding` is (x0, x1, y0, y1); `gain` scales f ⊗ f."""
    n, c, h, w = x.shape
    if up > 1:
        x = x.reshape(n, c, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(n, c, h * up, w * up)
    px0, px1, py0, py1 = padding
    x = F.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    x = x[:, :, max(-py0, 0): x.shape[2] - max(-py1, 0), max(-px0, 0): x.shape[3] - max(-px1, 0)]
    # A depthwise conv with the 2-D (outer-product) filter, strided to keep every `down`-th output: on the CPU this is
    # ~7× faster than two 1-D passes over [B·C, 1, H, W] (mkldnn is slow with one channel). True convolution, hence
    # the flip (a no-op for the symmetric [1, 3, 3, 1]).
    k = f.flip(0).to(x.dtype)
    k = torch.outer(k, k) * gain
    return F.conv2d(x, k[None, None].repeat(c, 1, 1, 1), stride=down, groups=c)


def upsample2d(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """2× FIR upsampling, [B, C, H, W] → [B, C, 2H, 2W] (gain 4 keeps the mean: 3 of 4 inserted pixels are 0)."""
    fw = f.numel()
    return upfirdn2d(x, f, up=2, padding=((fw + 1) // 2, (fw - 2) // 2) * 2, gain=4.0)


def conv2d_resample(x: torch.Tensor, w: torch.Tensor, f: torch.Tensor | None = None, up: int = 1, down: int = 1,
                    padding: int = 0, groups: int = 1) -> torch.Tensor:
    """2-D conv with optional 2× FIR up- or downsampling (stylegan2-ada's `conv2d_resample`, weights used as
    stored, i.e. its flip_weight=(up == 1)). `padding` is that of the conv at the output's resolution, so a 3×3 kernel
    with padding 1 maps H → 2H (up=2), H → H/2 (down=2) or H → H."""
    out_channels, in_per_group, kh, kw = w.shape
    if up == 1 and down == 1:
        return F.conv2d(x, w, padding=padding, groups=groups)
    if f is None:
        raise ValueError("resampling needs an FIR filter")
    if up > 1 and down > 1:
        raise ValueError("conv2d_resample: up and down at once is not implemented")
    fw = f.numel()
    p0 = p1 = padding
    if up > 1:
        p0, p1 = p0 + (fw + up - 1) // 2, p1 + (fw - up) // 2
    else:
        p0, p1 = p0 + (fw - down + 1) // 2, p1 + (fw - down) // 2
    if down > 1:
        if kh == 1 and kw == 1:  # blur-downsample first: the 1×1 conv then runs at the low resolution
            x = upfirdn2d(x, f, down=down, padding=(p0, p1, p0, p1))
            return F.conv2d(x, w, groups=groups)
        x = upfirdn2d(x, f, padding=(p0, p1, p0, p1))
        return F.conv2d(x, w, stride=down, groups=groups)
    # Up: a stride-`up` transposed conv (its weight is [in, out/groups, k, k]) then the blur on the fine grid.
    w = w.reshape(groups, out_channels // groups, in_per_group, kh, kw).transpose(1, 2)
    w = w.reshape(groups * in_per_group, out_channels // groups, kh, kw)
    p0, p1 = p0 - (kw - 1), p1 - (kw - up)
    pt = max(min(-p0, -p1), 0)
    x = F.conv_transpose2d(x, w, stride=up, padding=pt, groups=groups)
    return upfirdn2d(x, f, padding=(p0 + pt, p1 - pt, p0 + pt, p1 - pt), gain=up**2)


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, demodulate: bool = True,
                     padding: int = 0, up: int = 1, resample_filter: torch.Tensor | None = None) -> torch.Tensor:
    """StyleGAN2's weight (de)modulation (Karras et al. 2020, §2.2, eq. 1–3).

    w′_{b,o,i,k} = s_{b,i} · w_{o,i,k};  demodulated: w″ = w′ / √(Σ_{i,k} w′² + 1e-8).
    Executed as one grouped conv: the batch is folded into the channels ([1, B·I, H, W]) and each sample's weights
    form one group. x [B, I, H, W], weight [O, I, k, k], styles [B, I] → [B, O, H′, W′]; `up`=2 upsamples
    (see `conv2d_resample`, which gets `padding` and `resample_filter`).
    """
    b = x.shape[0]
    out_channels, in_channels, kh, kw = weight.shape
    if styles.shape != (b, in_channels):
        raise ValueError(f"styles must be [{b}, {in_channels}], got {list(styles.shape)}")
    if x.dtype == torch.float16 and demodulate:  # pre-normalise so that fp16 does not overflow (stylegan2-ada)
        weight = weight * (1 / math.sqrt(in_channels * kh * kw) / weight.norm(float("inf"), dim=[1, 2, 3],
                                                                               keepdim=True))
        styles = styles / styles.norm(float("inf"), dim=1, keepdim=True)
    w = weight.unsqueeze(0) * styles.reshape(b, 1, -1, 1, 1)  # [B, O, I, k, k]
    if demodulate:
        w = w * (w.square().sum(dim=[2, 3, 4], keepdim=True) + 1e-8).rsqrt()
    x = x.reshape(1, b * in_channels, *x.shape[2:])
    w = w.reshape(b * out_channels, in_channels, kh, kw).to(x.dtype)
    x = conv2d_resample(x, w, f=resample_filter, up=up, padding=padding, groups=b)
    return x.reshape(b, out_channels, *x.shape[2:])


# ---------------------------------------------------------------------------------------------------------------------
# Equalised-learning-rate layers.


class FullyConnectedLayer(nn.Module):
    """y = act(x · (W · lr_mul/√in)ᵀ + b · lr_mul), W ~ N(0, 1/lr_mul²) (equalised learning rate)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "linear",
                 lr_multiplier: float = 1.0, bias_init: float = 0.0) -> None:
        super().__init__()
        self.in_features, self.out_features, self.activation = in_features, out_features, activation
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, activation={self.activation}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias.to(x.dtype) * self.bias_gain if self.bias is not None else None
        if self.activation == "linear" and b is not None:
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return bias_act(x.matmul(w.t()), b, act=self.activation, gain=SQRT2 if self.activation == "lrelu" else 1.0)


class Conv2dLayer(nn.Module):
    """Equalised-lr conv (W ~ N(0, 1) scaled by 1/√(in·k²)) with optional 2× FIR downsampling and bias + activation
    (leaky ReLU gain √2)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True,
                 activation: str = "linear", down: int = 1, resample_filter: tuple[float, ...] = (1, 3, 3, 1),
                 conv_clamp: float | None = None) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.activation = in_channels, out_channels, activation
        self.down, self.padding, self.conv_clamp = down, kernel_size // 2, conv_clamp
        self.register_buffer("resample_filter", fir_filter(resample_filter), persistent=False)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size**2)
        self.act_gain = SQRT2 if activation == "lrelu" else 1.0

    def extra_repr(self) -> str:
        k = self.weight.shape[-1]
        return f"{self.in_channels}, {self.out_channels}, kernel_size={k}, down={self.down}, act={self.activation}"

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        w = (self.weight * self.weight_gain).to(x.dtype)
        x = conv2d_resample(x, w, f=self.resample_filter, down=self.down, padding=self.padding)
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, self.bias, act=self.activation, gain=self.act_gain * gain, clamp=clamp)


# ---------------------------------------------------------------------------------------------------------------------
# Generator.


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


class MappingNetwork(nn.Module):
    """z → w: z normalised by its second moment, then `num_layers` FC layers with leaky ReLU (StyleGAN, Karras et al.
    2019, §2), at learning rate × `lr_multiplier`. `w_avg` is the running mean of w, the centre of truncation."""

    def __init__(self, z_dim: int, w_dim: int, num_layers: int = 8, lr_multiplier: float = 0.01,
                 w_avg_beta: float = 0.995) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MappingNetwork needs at least one layer, got {num_layers}")
        self.z_dim, self.w_dim, self.num_layers, self.w_avg_beta = z_dim, w_dim, num_layers, w_avg_beta
        features = [z_dim] + [w_dim] * num_layers
        for idx in range(num_layers):  # fc0 … fc{n-1}: stylegan2-ada's names
            layer = FullyConnectedLayer(features[idx], features[idx + 1], activation="lrelu",
                                        lr_multiplier=lr_multiplier)
            setattr(self, f"fc{idx}", layer)
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z: torch.Tensor, update_w_avg: bool = False) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"MappingNetwork expects z [B, {self.z_dim}], got {list(z.shape)}")
        x = normalize_2nd_moment(z.to(torch.float32))
        for idx in range(self.num_layers):
            x = getattr(self, f"fc{idx}")(x)
        if update_w_avg:
            with torch.no_grad():
                self.w_avg.copy_(x.detach().float().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))  # f32 (amp)
        return x


NOISE_MODES = ("random", "const", "none")


class SynthesisLayer(nn.Module):
    """Modulated 3×3 conv (optionally 2× up) + noise · strength + bias + leaky ReLU (gain √2, optional clamp)."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, kernel_size: int = 3,
                 up: int = 1, use_noise: bool = True, resample_filter: tuple[float, ...] = (1, 3, 3, 1),
                 conv_clamp: float | None = None) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.resolution, self.up = in_channels, out_channels, resolution, up
        self.use_noise, self.padding, self.conv_clamp = use_noise, kernel_size // 2, conv_clamp
        self.register_buffer("resample_filter", fir_filter(resample_filter), persistent=False)
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)  # styles start at 1: identity modulation
        # No 1/√fan_in here: demodulation divides the weight's scale out anyway (stylegan2-ada does the same).
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        if use_noise:
            self.register_buffer("noise_const", torch.randn(resolution, resolution))
            self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, resolution={self.resolution}, up={self.up}"

    def forward(self, x: torch.Tensor, w: torch.Tensor, generator: torch.Generator | None = None,
                noise_mode: str = "random", gain: float = 1.0) -> torch.Tensor:
        styles = self.affine(w)
        x = modulated_conv2d(x, self.weight, styles, demodulate=True, padding=self.padding, up=self.up,
                             resample_filter=self.resample_filter)
        if self.use_noise and noise_mode == "random":
            x = x + draw_noise(x, self.resolution, generator) * self.noise_strength
        elif self.use_noise and noise_mode == "const":
            x = x + self.noise_const.to(x.dtype) * self.noise_strength
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, self.bias, act="lrelu", gain=SQRT2 * gain, clamp=clamp)


@torch.compiler.disable  # torch.compile cannot trace a draw from a torch.Generator: this one step stays eager
def draw_noise(x: torch.Tensor, resolution: int, generator: torch.Generator | None) -> torch.Tensor:
    """A noise input [B, 1, R, R] from `generator` (on x's device), so the images are a function of its seed."""
    return torch.randn([x.shape[0], 1, resolution, resolution], generator=generator, device=x.device, dtype=x.dtype)


class ToRGBLayer(nn.Module):
    """Modulated 1×1 conv to RGB, not demodulated (its output is the image); the equalised-lr gain goes on the
    styles."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, conv_clamp: float | None = None) -> None:
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_gain = 1 / math.sqrt(in_channels)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False)
        return bias_act(x, self.bias, clamp=self.conv_clamp)


class SynthesisBlock(nn.Module):
    """One resolution of the "skip" synthesis: [const | conv0 ↑2], conv1, toRGB; the running image is FIR-upsampled
    and this resolution's RGB added. Consumes `num_conv` + `num_torgb` w's (its toRGB shares the next block's
    first)."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, img_channels: int = 3,
                 resample_filter: tuple[float, ...] = (1, 3, 3, 1), conv_clamp: float | None = None) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.resolution = in_channels, out_channels, resolution
        self.register_buffer("resample_filter", fir_filter(resample_filter), persistent=False)
        self.num_conv, self.num_torgb = 0, 1
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn(out_channels, resolution, resolution))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=2,
                                        resample_filter=resample_filter, conv_clamp=conv_clamp)
            self.num_conv += 1
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution, conv_clamp=conv_clamp)
        self.num_conv += 1
        self.torgb = ToRGBLayer(out_channels, img_channels, w_dim, conv_clamp=conv_clamp)

    def forward(self, x: torch.Tensor | None, img: torch.Tensor | None, ws: torch.Tensor,
                generator: torch.Generator | None = None, noise_mode: str = "random") -> tuple[torch.Tensor,
                                                                                                torch.Tensor]:
        w_iter = iter(ws.unbind(dim=1))
        if self.in_channels == 0:
            x = self.const.to(ws.dtype).unsqueeze(0).expand(ws.shape[0], -1, -1, -1)
        else:
            assert x is not None
            x = self.conv0(x, next(w_iter), generator, noise_mode)
        x = self.conv1(x, next(w_iter), generator, noise_mode)
        y = self.torgb(x, next(w_iter)).to(torch.float32)
        img = y if img is None else upsample2d(img, self.resample_filter) + y
        return x, img


class SynthesisNetwork(nn.Module):
    """w's → image: StyleGAN2's synthesis network with the "skip" output architecture (config F).

    Channels at resolution r are min(channel_base // r, channel_max). `num_ws` = 2·log2(R) − 2 (one per conv and
    one for the last toRGB, as stylegan2-ada counts them). Meets base.py's synthesis contract; the output is linear,
    roughly in [-1, 1] once trained, not squashed.
    """

    def __init__(self, w_dim: int, resolution: int, channel_base: int = 32768, channel_max: int = 512,
                 img_channels: int = 3, conv_clamp: float | None = None,
                 resample_filter: tuple[float, ...] = (1, 3, 3, 1)) -> None:
        super().__init__()
        log2 = check_resolution(resolution)
        self.w_dim, self.resolution, self.img_channels = w_dim, resolution, img_channels
        self.block_resolutions = [2**i for i in range(2, log2 + 1)]
        self.num_ws = 0
        for res in self.block_resolutions:
            in_channels = channels_at(res // 2, channel_base, channel_max) if res > 4 else 0
            block = SynthesisBlock(in_channels, channels_at(res, channel_base, channel_max), w_dim, res,
                                   img_channels, resample_filter, conv_clamp)
            setattr(self, f"b{res}", block)  # b4 … bR: stylegan2-ada's names
            self.num_ws += block.num_conv
        self.num_ws += 1  # the last toRGB's

    def forward(self, ws: torch.Tensor, generator: torch.Generator | None = None,
                noise_mode: str = "random") -> torch.Tensor:
        if ws.dim() != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"SynthesisNetwork expects ws [B, {self.num_ws}, {self.w_dim}], got {list(ws.shape)}")
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        ws = ws.to(torch.float32)
        x = img = None
        w_idx = 0
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")
            x, img = block(x, img, ws.narrow(1, w_idx, block.num_conv + block.num_torgb), generator, noise_mode)
            w_idx += block.num_conv
        assert img is not None
        return img


# ---------------------------------------------------------------------------------------------------------------------
# Discriminator.


class DiscriminatorBlock(nn.Module):
    """"resnet" block r → r/2: [fromRGB 1×1,] conv 3×3, conv 3×3 ↓2, plus a 1×1 ↓2 skip; both branches × √½."""

    def __init__(self, in_channels: int, tmp_channels: int, out_channels: int, img_channels: int = 3,
                 resample_filter: tuple[float, ...] = (1, 3, 3, 1), conv_clamp: float | None = None) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.fromrgb = (Conv2dLayer(img_channels, tmp_channels, 1, activation="lrelu", conv_clamp=conv_clamp)
                        if in_channels == 0 else None)
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, 3, activation="lrelu", conv_clamp=conv_clamp)
        self.conv1 = Conv2dLayer(tmp_channels, out_channels, 3, activation="lrelu", down=2,
                                 resample_filter=resample_filter, conv_clamp=conv_clamp)
        self.skip = Conv2dLayer(tmp_channels, out_channels, 1, bias=False, down=2, resample_filter=resample_filter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fromrgb is not None:
            x = self.fromrgb(x)
        y = self.skip(x, gain=math.sqrt(0.5))
        x = self.conv1(self.conv0(x), gain=math.sqrt(0.5))
        return y + x


class MinibatchStdLayer(nn.Module):
    """Minibatch standard deviation (Karras et al. 2018, §3): per group of G samples, the stddev of each feature over
    the group, averaged over channels (in `num_channels` slices) and pixels, appended as `num_channels` maps.

    G = the largest divisor of the batch ≤ min(group_size, B), so any batch works (stylegan2-ada requires
    B % G == 0); sample i is in group i mod (B/G), as there.
    """

    def __init__(self, group_size: int = 4, num_channels: int = 1) -> None:
        super().__init__()
        if group_size < 1 or num_channels < 1:
            raise ValueError(f"mbstd group_size and num_channels must be ≥ 1, got {group_size}, {num_channels}")
        self.group_size, self.num_channels = group_size, num_channels

    def group_for(self, batch: int) -> int:
        g = min(self.group_size, batch)
        while batch % g:
            g -= 1
        return g

    def forward(self, x: torch.Tensor, parts: tuple[int, ...] | None = None) -> torch.Tensor:
        """`parts`: sizes of sub-batches whose samples never share a group (reals and fakes of one D call)."""
        if parts is not None and len(parts) > 1:
            if sum(parts) != x.shape[0]:
                raise ValueError(f"mbstd: parts {parts} do not add up to the batch of {x.shape[0]}")
            return torch.cat([self(chunk) for chunk in x.split(list(parts))])
        n, c, h, w = x.shape
        g, f = self.group_for(n), self.num_channels
        if c % f:
            raise ValueError(f"mbstd: {c} channels do not split into {f} slices")
        y = x.reshape(g, -1, f, c // f, h, w)  # [G, n, F, c, H, W]
        y = y - y.mean(dim=0)
        y = (y.square().mean(dim=0) + 1e-8).sqrt()  # [n, F, c, H, W] stddev over the group
        y = y.mean(dim=[2, 3, 4]).reshape(-1, f, 1, 1)  # [n, F, 1, 1]
        y = y.repeat(g, 1, h, w)  # [N, F, H, W]
        return torch.cat([x, y], dim=1)


class DiscriminatorHead(nn.Module):
    """4×4 epilogue: mbstd, conv 3×3, flatten, FC (→ the features), FC → 1 logit."""

    def __init__(self, in_channels: int, resolution: int = 4, mbstd_group_size: int = 4, mbstd_num_channels: int = 1,
                 conv_clamp: float | None = None) -> None:
        super().__init__()
        self.resolution = resolution
        self.mbstd = MinibatchStdLayer(mbstd_group_size, mbstd_num_channels) if mbstd_num_channels > 0 else None
        self.conv = Conv2dLayer(in_channels + mbstd_num_channels, in_channels, 3, activation="lrelu",
                                conv_clamp=conv_clamp)
        self.fc = FullyConnectedLayer(in_channels * resolution**2, in_channels, activation="lrelu")
        self.out = FullyConnectedLayer(in_channels, 1)

    def forward(self, x: torch.Tensor, parts: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[2:] != (self.resolution, self.resolution):
            raise ValueError(f"discriminator head expects {self.resolution}×{self.resolution} maps, got "
                             f"{list(x.shape)}")
        x = x.to(torch.float32)
        if self.mbstd is not None:
            x = self.mbstd(x, parts)
        features = self.fc(self.conv(x).flatten(1))
        return self.out(features).squeeze(1), features


class DiscriminatorTrunk(nn.Module):
    """StyleGAN2's "resnet" discriminator (config F) as base.py's trunk: `blocks` R → … → 4×4 (block 0 holds fromRGB),
    `widths` (channels out of each block), `head(x, parts=None) -> (logits [B], features [B, C4])`."""

    batch_statistics = True  # the head's minibatch stddev mixes samples: D calls pass parts=(reals, fakes)

    def __init__(self, resolution: int, channel_base: int = 32768, channel_max: int = 512, mbstd_group_size: int = 4,
                 mbstd_num_channels: int = 1, img_channels: int = 3, conv_clamp: float | None = None,
                 resample_filter: tuple[float, ...] = (1, 3, 3, 1)) -> None:
        super().__init__()
        log2 = check_resolution(resolution)
        self.resolution = resolution
        self.block_resolutions = [2**i for i in range(log2, 2, -1)]  # R … 8
        self.blocks = nn.ModuleList()
        self.widths: list[int] = []
        for res in self.block_resolutions:
            tmp = channels_at(res, channel_base, channel_max)
            out = channels_at(res // 2, channel_base, channel_max)
            in_channels = 0 if res == resolution else tmp
            self.blocks.append(DiscriminatorBlock(in_channels, tmp, out, img_channels, resample_filter, conv_clamp))
            self.widths.append(out)
        self.head = DiscriminatorHead(channels_at(4, channel_base, channel_max), 4, mbstd_group_size,
                                      mbstd_num_channels, conv_clamp)
        self.feature_dim = channels_at(4, channel_base, channel_max)  # the head's FC output

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, features) without quantizers; `base.Discriminator` runs the blocks itself."""
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def stylegan2_parts(z_dim: int = 512, w_dim: int = 512, resolution: int = 256, channel_base: int = 32768,
                    channel_max: int = 512, mapping_layers: int = 8, *, conv_clamp: float | None = None,
                    mbstd_group_size: int = 4, mbstd_num_channels: int = 1,
                    ) -> tuple[MappingNetwork, SynthesisNetwork, DiscriminatorTrunk]:
    """(mapping, synthesis, trunk) for `base.Generator(synthesis, z_dim, w_dim, mapping=mapping)` and
    `base.Discriminator(trunk, ...)`. Config F: z_dim = w_dim = 512, channel_base 32768 (stylegan2-ada's "paper256"
    uses 16384), channel_max 512, 8 mapping layers; stylegan2-ada trains with conv_clamp 256 (it matters in fp16)."""
    mapping = MappingNetwork(z_dim, w_dim, num_layers=mapping_layers)
    synthesis = SynthesisNetwork(w_dim, resolution, channel_base, channel_max, conv_clamp=conv_clamp)
    trunk = DiscriminatorTrunk(resolution, channel_base, channel_max, mbstd_group_size, mbstd_num_channels,
                               conv_clamp=conv_clamp)
    return mapping, synthesis, trunk
