"""Neural style transfer by image optimisation (Gatys, Ecker & Bethge 2016).

The image x is optimised so that its VGG-19 responses match the content image on conv4_2 and the
Gram matrices of its responses match the style image(s) on conv1_1 .. conv5_1:

    L(x) = alpha * L_content + beta * L_style + tv_weight * L_tv

Conventions (the numbers in tests and docs depend on them):
- Layer names follow the paper: ``convB_I`` is the *rectified* response of the I-th convolution of
  block B, i.e. the output of ``reluB_I`` (Gatys et al. take the ReLU outputs); ``reluB_I`` is an
  alias of the same tensor, ``poolB`` the output of the B-th pooling layer.
- ``gram(F)`` divides F Fᵀ by C*H*W, so Gram entries do not grow with image size or channel count.
- ``content_loss`` is the mean squared error, ``style_loss`` the weighted sum over layers of the
  squared Frobenius distance between Grams, ``tv_loss`` the mean squared neighbour difference.
- In ``stylize`` every layer's loss is divided by the squared magnitude of its own target
  (mean(P²) for content, ||A||²_F for style), so each term is a *relative* error. This makes
  alpha/beta independent of the activation scale of the feature network (arbitrary for the
  random-weight fallback; the defaults were tuned on it, the ImageNet weights being unavailable
  offline). It is Gatys' loss with a fixed weight per layer.
- One step is one function evaluation (one forward + backward pass) for both optimisers: L-BFGS
  runs one iteration per step without line search, which costs exactly one evaluation.
- The loss is evaluated at clamp(x, 0, 1); the result is the best image evaluated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from models.lbfgs import CompactLBFGS

PoolMode = Literal["max", "avg"]
ProgressFn = Callable[["ProgressInfo"], bool]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CONTENT_LAYERS = ("conv4_2",)
STYLE_LAYERS = ("conv1_1", "conv2_1", "conv3_1", "conv4_1", "conv5_1")
DEFAULT_LAYERS = STYLE_LAYERS + CONTENT_LAYERS
# the VGG-19 ("E") configuration of torchvision.models.vgg: channels per conv, "M" for a pooling layer
_VGG19_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                                     512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
MIN_SIZE = 16  # four poolings before conv5_1 still leave one pixel
MAX_MULTIRES = 4
LBFGS_HISTORY = 50  # 2 * 50 image-sized vectors: 300 MB at 512 px; 100 converged no better here
RESTART_FACTOR = 100.0  # an L-BFGS evaluation this far above the best so far is a blow-up: restart


def _vgg19_module_names() -> tuple[str, ...]:
    """Names of torchvision's vgg19().features modules, by index: conv1_1, relu1_1, ..., pool5."""
    names: list[str] = []
    block, conv = 1, 1
    for v in _VGG19_CFG:
        if v == "M":
            names.append(f"pool{block}")
            block, conv = block + 1, 1
        else:
            names += [f"conv{block}_{conv}", f"relu{block}_{conv}"]
            conv += 1
    return tuple(names)


VGG19_MODULES = _vgg19_module_names()


def vgg19_features(upto: int) -> nn.Sequential:
    """VGG-19's convolutional part (Simonyan and Zisserman 2015, configuration E) up to module index `upto`
    (inclusive), laid out as torchvision's ``vgg19().features`` (3x3 convolutions with padding 1, each followed by
    an in-place ReLU; 2x2 max pooling with stride 2), so checkpoints and layer names match by index. Built here
    rather than by torchvision, whose import costs seconds in every process that serves style transfer."""
    layers: list[nn.Module] = []
    channels = 3
    for v in _VGG19_CFG:
        if len(layers) > upto:
            break
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = int(v)
    return nn.Sequential(*layers[: upto + 1])


def layer_index(name: str) -> int:
    """Index in vgg19().features of the module whose output the layer name denotes (convB_I -> reluB_I)."""
    key = "relu" + name[4:] if name.startswith("conv") else name
    if not key.startswith(("relu", "pool")) or key not in VGG19_MODULES:
        raise ValueError(f"unknown VGG-19 layer {name!r}: use convB_I / reluB_I (B 1-5) or poolB")
    return VGG19_MODULES.index(key)


class StyleCancelled(Exception):
    """The progress callback asked to stop."""

    def __init__(self, step: int) -> None:
        super().__init__(f"style transfer cancelled after step {step}")
        self.step = step


# ----------------------------------------------------------------------------------------------
# feature network


class VGGFeatures(nn.Module):
    """VGG-19 convolutional layers up to the deepest layer in `layers`, returning named activations.

    Input: RGB in [0, 1], shape [B, 3, H, W]; ImageNet normalisation happens inside. Module indices
    equal torchvision's ``vgg19().features`` indices, so its checkpoints load by renaming only.
    Parameters are frozen: style transfer needs gradients for the image, never for the weights.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, layers: Sequence[str] = DEFAULT_LAYERS, pool: PoolMode = "max", seed: int = 0) -> None:
        super().__init__()
        if not layers:
            raise ValueError("VGGFeatures needs at least one layer")
        _check_pool(pool)
        self.layer_names = tuple(dict.fromkeys(layers))
        last = max(layer_index(n) for n in self.layer_names)
        # built on the meta device (no memory, no default initialisation), real storage allocated below
        with torch.device("meta"):
            features = vgg19_features(last)
        self.layers = features.to_empty(device="cpu")
        self.pool = pool
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        _he_init_(self, torch.Generator().manual_seed(seed), zero_mean=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor], layers: Sequence[str] = DEFAULT_LAYERS,
                        pool: PoolMode = "max") -> VGGFeatures:
        """Features with torchvision vgg19 weights (keys ``features.N.*``, or bare ``N.*``; others ignored)."""
        net = cls(layers, pool)
        wanted = set(net.layers.state_dict())
        prefixed = any(k.startswith("features.") for k in sd)
        mapped: dict[str, Tensor] = {}
        for key, value in sd.items():
            if prefixed:
                if not key.startswith("features."):
                    continue  # the classifier
                key = key[len("features."):]
            if key in wanted:
                mapped[key] = value.float()
        missing = sorted(wanted - set(mapped))
        if missing:
            more = " ..." if len(missing) > 4 else ""
            raise ValueError(f"state dict lacks VGG-19 feature weights {missing[:4]}{more}")
        net.layers.load_state_dict(mapped, strict=True)
        return net

    def forward(self, x: Tensor, layers: Iterable[str] | None = None,
                pool: PoolMode | None = None) -> dict[str, Tensor]:
        """Activations of the requested layers (default: all this network was built for)."""
        names = tuple(layers) if layers is not None else self.layer_names
        at: dict[int, list[str]] = {}
        for n in names:
            at.setdefault(layer_index(n), []).append(n)
        last = max(at)
        if last >= len(self.layers):
            raise ValueError(f"layer(s) {[n for n in names if layer_index(n) >= len(self.layers)]} lie beyond "
                             f"this network's last layer {VGG19_MODULES[len(self.layers) - 1]}")
        mode = pool or self.pool
        h = (x - self.mean) / self.std
        out: dict[str, Tensor] = {}
        for i, module in enumerate(self.layers):
            if isinstance(module, nn.MaxPool2d):
                h = F.avg_pool2d(h, 2, 2) if mode == "avg" else F.max_pool2d(h, 2, 2)
            else:
                h = module(h)
            for n in at.get(i, ()):
                out[n] = h
            if i == last:  # stop early: nothing deeper is needed for this call
                break
        return out


def _convs(net: VGGFeatures) -> list[nn.Conv2d]:
    return [m for m in net.layers if isinstance(m, nn.Conv2d)]


@torch.no_grad()
def _he_init_(net: VGGFeatures, gen: torch.Generator, zero_mean: bool) -> None:
    """He-normal weights (std sqrt(2 / fan_in), the ReLU-preserving scale) and zero biases."""
    for k, conv in enumerate(_convs(net)):
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        w = torch.randn(conv.weight.shape, generator=gen) * math.sqrt(2.0 / fan_in)
        if zero_mean and k > 0:
            # inputs after a ReLU are all positive, so a random filter's response carries a constant
            # part (mean input times the filter sum); zero-sum filters respond to local structure only
            w -= w.mean(dim=(1, 2, 3), keepdim=True)
            w *= math.sqrt(2.0 / fan_in) / w.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
        conv.weight.copy_(w)
        assert conv.bias is not None
        conv.bias.zero_()


def _pink_noise(size: int, gen: torch.Generator) -> Tensor:
    """A 1/f-spectrum colour image in [0, 1]: a cheap stand-in for natural-image statistics."""
    white = torch.randn(1, 3, size, size, generator=gen)
    fy = torch.fft.fftfreq(size).view(-1, 1)
    fx = torch.fft.rfftfreq(size).view(1, -1)
    f = torch.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    img = torch.fft.irfft2(torch.fft.rfft2(white) / f, s=(size, size))
    img = img - img.amin(dim=(2, 3), keepdim=True)
    return img / img.amax(dim=(2, 3), keepdim=True)


@torch.no_grad()
def _rescale_(net: VGGFeatures, probe: Tensor) -> None:
    """Scale each conv so its rectified output has unit RMS on `probe` (LSUV, Mishkin & Matas 2016)."""
    h = (probe - net.mean) / net.std
    for module in net.layers:
        if isinstance(module, nn.Conv2d):
            y = module(h)
            rms = float(F.relu(y).square().mean().sqrt())
            scale = 1.0 / max(rms, 1e-12)
            module.weight.mul_(scale)
            assert module.bias is not None
            module.bias.mul_(scale)
            h = y * scale
        elif isinstance(module, nn.MaxPool2d):
            h = F.avg_pool2d(h, 2, 2) if net.pool == "avg" else F.max_pool2d(h, 2, 2)
        else:
            h = module(h)


def random_vgg_features(seed: int = 0, layers: Sequence[str] = DEFAULT_LAYERS, pool: PoolMode = "max", *,
                        zero_mean: bool = False, rescale: bool = True) -> VGGFeatures:
    """Offline fallback: VGG-19 with seeded random weights set up for Gram statistics (docs/style-transfer.md).

    He-normal weights (std sqrt(2 / fan_in)) keep the second moment of ReLU activations in
    expectation, with zero biases. Max pooling is the default: in the 128 px comparison it reached
    1.2-3.2x lower final (relative) losses on all 6 pairs (docs/bench/style-grid.json), kept the content
    legible and never produced colour
    fringes; average pooling (Gatys' choice for trained weights) gives larger, swirlier strokes and
    stays available per request (StyleParams.pool). `rescale` sets every layer's output RMS to 1 on
    a 1/f-noise probe: He init only holds in expectation and for inputs it assumes; measured on a
    photo, plain He drifts to an RMS of 0.47 by relu5_1 with average pooling and to 0.04 with `zero_mean`
    filters (docs/bench/style-checks.json). With zero biases the net is positively homogeneous, so under
    stylize's relative losses rescaling changes no fp32 result; it keeps bf16/fp16 autocast in range
    and makes absolute (Gatys-style) Gram losses comparable across layers. `zero_mean` (zero-sum
    filters after the first layer) is kept for experiments: it made results noisier and weakened
    the content.
    """
    net = VGGFeatures(layers, pool, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    _he_init_(net, gen, zero_mean=zero_mean)
    if rescale:
        _rescale_(net, _pink_noise(128, gen))
    return net


# ----------------------------------------------------------------------------------------------
# losses


def gram(features: Tensor) -> Tensor:
    """Gram matrices F Fᵀ / (C*H*W) of [B, C, H, W] features, as float32 [B, C, C] (outside autocast)."""
    b, c, h, w = features.shape
    with torch.autocast(features.device.type, enabled=False):
        if c > 1 and not features.is_contiguous() and features.is_contiguous(memory_format=torch.channels_last):
            # channels_last activations are [B, H*W, C] in memory: use them as they lie, no copy
            ft = features.permute(0, 2, 3, 1).reshape(b, h * w, c).float()
            return torch.bmm(ft.transpose(1, 2), ft) / (c * h * w)
        f = features.reshape(b, c, h * w).float()
        return torch.bmm(f, f.transpose(1, 2)) / (c * h * w)


def content_loss(features: Tensor, target: Tensor) -> Tensor:
    """Mean squared error between features and their target (float32)."""
    return (features.float() - target.float()).square().mean()


def style_loss(features: Mapping[str, Tensor], targets: Mapping[str, Tensor],
               weights: Mapping[str, float] | None = None) -> Tensor:
    """Sum over layers of weight * ||gram(F) - A||²_F (mean over the batch); equal weights 1/n by default."""
    names = list(targets)
    if weights is None:
        weights = {n: 1.0 / len(names) for n in names}
    total = torch.zeros((), device=next(iter(features.values())).device)
    for n in names:
        g = gram(features[n])
        total = total + weights[n] * (g - targets[n].to(g.dtype)).square().sum(dim=(-2, -1)).mean()
    return total


def tv_loss(x: Tensor) -> Tensor:
    """Total variation: mean squared vertical plus mean squared horizontal neighbour difference."""
    dy = x[..., 1:, :] - x[..., :-1, :]
    dx = x[..., :, 1:] - x[..., :, :-1]
    return dy.float().square().mean() + dx.float().square().mean()


# ----------------------------------------------------------------------------------------------
# parameters


@dataclass
class StyleParams:
    """Settings of one style transfer; invalid values raise ValueError at construction."""

    steps: int = 300
    size: int = 512
    content_weight: float = 1.0
    # beta for relative losses (see module docstring), chosen on the random fallback network at
    # 256 px (docs/style-transfer.md): 1e3 gives strong, clean strokes; 1e1-1e2 keep more photo
    style_weight: float = 1e3
    tv_weight: float = 0.0
    content_layers: list[str] = field(default_factory=lambda: list(CONTENT_LAYERS))
    style_layers: list[str] = field(default_factory=lambda: list(STYLE_LAYERS))
    style_layer_weights: list[float] | None = None
    init: Literal["content", "noise"] = "content"
    optimizer: Literal["lbfgs", "adam"] = "lbfgs"
    lr: float = 0.02
    style_blend: list[float] | None = None
    preserve_colors: bool = False
    multires: int = 1
    seed: int = 0
    pool: PoolMode | None = None  # None: the feature network's own setting

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ValueError when a value is invalid (run at construction, and again by plan_stylize)."""
        _int_in("steps", self.steps, 1, 100_000)
        _int_in("size", self.size, MIN_SIZE, 16_384)
        _int_in("multires", self.multires, 1, MAX_MULTIRES)
        _int_in("seed", self.seed, 0, 2**63 - 1)
        for name in ("content_weight", "style_weight", "tv_weight", "lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.content_weight == 0 and self.style_weight == 0:
            raise ValueError("content_weight and style_weight are both 0: nothing to optimise")
        if self.init not in ("content", "noise"):
            raise ValueError(f"init must be 'content' or 'noise', got {self.init!r}")
        if self.optimizer not in ("lbfgs", "adam"):
            raise ValueError(f"optimizer must be 'lbfgs' or 'adam', got {self.optimizer!r}")
        if self.pool is not None:
            _check_pool(self.pool)
        if not isinstance(self.preserve_colors, bool):
            raise ValueError(f"preserve_colors must be true or false, got {self.preserve_colors!r}")
        for name in ("content_layers", "style_layers"):
            names = getattr(self, name)
            if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"{name} must be a list of layer names")
            for n in names:
                layer_index(n)
            if len(set(names)) != len(names):
                raise ValueError(f"{name} lists a layer twice")
        if self.content_weight > 0 and not self.content_layers:
            raise ValueError("content_layers is empty but content_weight > 0")
        if self.style_weight > 0 and not self.style_layers:
            raise ValueError("style_layers is empty but style_weight > 0")
        if self.style_layer_weights is not None:
            _weights("style_layer_weights", self.style_layer_weights, len(self.style_layers))
        if self.style_blend is not None:
            _weights("style_blend", self.style_blend, None)
        if self.steps < self.multires:
            raise ValueError(f"steps ({self.steps}) must be at least multires ({self.multires}): one per level")
        if self.size >> (self.multires - 1) < MIN_SIZE:
            raise ValueError(f"size {self.size} with multires {self.multires} makes the coarsest level smaller "
                             f"than {MIN_SIZE} px")

    def blend_weights(self, n_styles: int) -> list[float]:
        """Normalised weight per style image (equal by default)."""
        if n_styles < 1:
            raise ValueError("at least one style image is required")
        if self.style_blend is None:
            return [1.0 / n_styles] * n_styles
        return _weights("style_blend", self.style_blend, n_styles)

    def layer_weights(self) -> dict[str, float]:
        """Normalised weight per style layer (equal by default)."""
        raw = self.style_layer_weights or [1.0] * len(self.style_layers)
        w = _weights("style_layer_weights", raw, len(self.style_layers))
        return dict(zip(self.style_layers, w, strict=True))


def _int_in(name: str, v: object, lo: int, hi: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")


def _check_pool(pool: object) -> None:
    if pool not in ("max", "avg"):
        raise ValueError(f"pool must be 'max' or 'avg', got {pool!r}")


def _weights(name: str, values: Sequence[float], n: int | None) -> list[float]:
    """Validate non-negative finite weights with a positive sum and return them normalised to sum 1."""
    vals = list(values)
    if n is not None and len(vals) != n:
        raise ValueError(f"{name} has {len(vals)} weights for {n} items")
    if not vals or any(isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0
                       for v in vals):
        raise ValueError(f"{name} must be finite numbers >= 0")
    total = float(sum(vals))
    if total <= 0:
        raise ValueError(f"{name} must have a positive sum")
    return [float(v) / total for v in vals]


# ----------------------------------------------------------------------------------------------
# images


def to_tensor(img: Image.Image) -> Tensor:
    """PIL image -> float32 [1, 3, H, W] in [0, 1] (any mode is converted to RGB)."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def to_pil(x: Tensor) -> Image.Image:
    """[1, C, H, W] or [C, H, W] tensor in [0, 1] (C = 3, or 1 for grey) -> PIL image, clamped and rounded."""
    t = x.detach().float().cpu()
    if t.dim() == 4:
        t = t[0]
    arr = (t.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr[..., 0], "L") if arr.shape[2] == 1 else Image.fromarray(arr, "RGB")


def fit_size(width: int, height: int, longest: int) -> tuple[int, int]:
    """(width, height) scaled so the longest side is `longest`, aspect kept."""
    scale = longest / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _resized(img: Image.Image, size: tuple[int, int]) -> Tensor:
    return to_tensor(img.convert("RGB").resize(size, Image.Resampling.LANCZOS))


# YIQ (NTSC): Y is luminance, I and Q the chroma that colour preservation keeps from the content
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263], [0.211456, -0.522591, 0.311135]])
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)


def rgb_to_yiq(x: Tensor) -> Tensor:
    """[B, 3, H, W] RGB -> YIQ."""
    return torch.einsum("ij,bjhw->bihw", _RGB2YIQ.to(x), x)


def yiq_to_rgb(x: Tensor) -> Tensor:
    """[B, 3, H, W] YIQ -> RGB."""
    return torch.einsum("ij,bjhw->bihw", _YIQ2RGB.to(x), x)


# ----------------------------------------------------------------------------------------------
# the optimisation


@dataclass(frozen=True)
class ProgressInfo:
    """Reported after every step: losses are weighted (total = content + style + tv) at the point evaluated
    in this step; `image()` renders the best image evaluated so far (the one stylize would return)."""

    step: int
    total: int
    level: int
    levels: int
    loss: float
    content: float
    style: float
    tv: float
    image: Callable[[], Image.Image]


@dataclass
class _Targets:
    content: dict[str, Tensor]
    content_weights: dict[str, float]  # 1 / (n_layers * mean(P²)): relative error
    grams: dict[str, Tensor]
    style_weights: dict[str, float]  # w_l / ||A_l||²_F: relative error


class _Level:
    """Images, targets and the loss of one resolution level."""

    def __init__(self, content: Image.Image, styles: list[tuple[Image.Image, float]], size: tuple[int, int],
                 params: StyleParams, features: VGGFeatures, device: torch.device, amp: torch.dtype | None) -> None:
        self.params = params
        self.features = features
        self.device = device
        self.amp = amp
        self.channels_last = _use_channels_last(device)
        c = _resized(content, size).to(device)
        self.chroma: Tensor | None = None
        style_imgs = [(_resized(s, fit_size(*s.size, max(size))).to(device), w) for s, w in styles]
        if params.preserve_colors:
            # Gatys et al. 2016, "Preserving colour in neural artistic style transfer": transfer on
            # luminance only, with the style's luminance mean/std matched to the content's
            yiq = rgb_to_yiq(c)
            self.chroma = yiq[:, 1:]
            cy = yiq[:, :1]
            mu_c, sd_c = cy.mean(), cy.std()
            matched = []
            for s, w in style_imgs:
                sy = rgb_to_yiq(s)[:, :1]
                sy = ((sy - sy.mean()) * (sd_c / sy.std().clamp_min(1e-6)) + mu_c).clamp(0, 1)
                matched.append((sy, w))
            c, style_imgs = cy, matched
        self.content_image = c
        self.targets = self._targets(c, style_imgs)

    def net_input(self, x: Tensor) -> Tensor:
        """The variable as the network sees it: 3 channels (luminance is repeated), channels_last where faster."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _forward(self, x: Tensor, layers: Sequence[str]) -> dict[str, Tensor]:
        if self.amp is None:
            return self.features(self.net_input(x), layers, self.params.pool)
        with torch.autocast(self.device.type, dtype=self.amp):
            return self.features(self.net_input(x), layers, self.params.pool)

    @torch.no_grad()
    def _targets(self, content: Tensor, styles: list[tuple[Tensor, float]]) -> _Targets:
        p = self.params
        c_layers = p.content_layers if p.content_weight > 0 else []
        s_layers = p.style_layers if p.style_weight > 0 else []
        content_t: dict[str, Tensor] = {}
        content_w: dict[str, float] = {}
        if c_layers:
            feats = self._forward(content, c_layers)
            for n in c_layers:
                content_t[n] = feats[n].float().clone()
                content_w[n] = 1.0 / (len(c_layers) * max(float(content_t[n].square().mean()), 1e-30))
        grams: dict[str, Tensor] = {}
        if s_layers:
            for img, w in styles:  # computed once: the blended Gram target of each layer
                feats = self._forward(img, s_layers)
                for n in s_layers:
                    g = w * gram(feats[n])
                    grams[n] = grams[n] + g if n in grams else g
        lw = p.layer_weights()
        style_w = {n: lw[n] / max(float(grams[n].square().sum()), 1e-30) for n in s_layers}
        return _Targets(content_t, content_w, grams, style_w)

    def losses(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(total, weighted content, weighted style, weighted tv) at x."""
        p, t = self.params, self.targets
        layers = list(dict.fromkeys([*t.content, *t.grams]))
        feats = self._forward(x, layers)
        zero = torch.zeros((), device=x.device)
        c = sum((w * content_loss(feats[n], t.content[n]) for n, w in t.content_weights.items()), zero)
        s = style_loss(feats, t.grams, t.style_weights) if t.grams else zero
        tv = tv_loss(x) if p.tv_weight > 0 else zero
        c, s, tv = p.content_weight * c, p.style_weight * s, p.tv_weight * tv
        return c + s + tv, c, s, tv

    def compose(self, x: Tensor) -> Tensor:
        """The RGB image for a variable (luminance + the content's chroma when preserving colours)."""
        if self.chroma is None:
            return x.detach().clamp(0, 1)
        return yiq_to_rgb(torch.cat([x.detach().clamp(0, 1), self.chroma], dim=1)).clamp(0, 1)


def _level_sizes(size: tuple[int, int], levels: int) -> list[tuple[int, int]]:
    """Sizes from coarse to fine; each level doubles toward the final size."""
    w, h = size
    return [(max(1, round(w / 2**k)), max(1, round(h / 2**k))) for k in range(levels - 1, -1, -1)]


def _split_steps(steps: int, levels: int) -> list[int]:
    """Steps per level: an equal split, the remainder to the finest levels."""
    base, extra = divmod(steps, levels)
    return [base + (1 if k >= levels - extra else 0) for k in range(levels)]


def prepare_features(features: VGGFeatures, device: torch.device) -> VGGFeatures:
    """Move the feature network to `device` in the layout stylize uses there (channels_last on CUDA and oneDNN
    CPUs), and on CUDA wait for the copies: jobs on other CUDA streams may then read the weights at once. A
    network already there is left alone (no wait: other jobs may be running)."""
    first = next(features.parameters())
    on_device = first.device.type == device.type and device.index in (None, first.device.index)
    layout = torch.channels_last if _use_channels_last(device) else None
    if on_device and (layout is None or first.is_contiguous(memory_format=layout)):
        return features
    features.to(device)
    if layout is not None:
        features.to(memory_format=layout)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return features


def _use_channels_last(device: torch.device) -> bool:
    # cuDNN and oneDNN convolutions run NHWC natively (on this CPU at one thread no gain per step was measured:
    # 0.99x, docs/bench/style-checks.json; kept for CUDA and for the serving models)
    return device.type == "cuda" or (device.type == "cpu" and torch.backends.mkldnn.is_available())


def _default_amp(device: torch.device) -> torch.dtype | None:
    # bf16 convolutions on CUDA; Grams and losses stay float32 (gram() leaves autocast), which keeps
    # the loss accurate enough for L-BFGS's curvature pairs. Off on the CPU: bf16 speed there depends
    # on the CPU (AVX512-BF16 here: 1.48-1.64x faster per step, but a 4% higher loss, 0.470 vs 0.450:
    # docs/bench/style-checks.json)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def min_side(layers: Iterable[str]) -> int:
    """Smallest image side (px) from which the feature network reaches every layer in `layers`.

    Each 2x2 pooling up to the deepest layer halves the image (rounding down) and fails on a side of
    one pixel, so p poolings need 2**p px (16 for conv5_1, 8 for conv4_2). Never below 2: the
    total-variation loss and colour preservation's standard deviation are undefined on one pixel.
    """
    names = list(layers)
    if not names:
        return 2
    deepest = max(layer_index(n) for n in names)
    pools = sum(1 for m in VGG19_MODULES[: deepest + 1] if m.startswith("pool"))
    return max(2, 2**pools)


@dataclass(frozen=True)
class StylePlan:
    """What `stylize` does for given parameters and image sizes (returned only when it can run)."""

    size: tuple[int, int]  # (width, height) of the result
    levels: tuple[tuple[int, int], ...]  # (width, height) of each multires level, coarse to fine
    steps: tuple[int, ...]  # steps per level
    blend: tuple[float, ...]  # normalised weight per style image
    min_side: int  # smallest side the optimised image may have at any level


def _size_pair(what: str, size: object) -> tuple[int, int]:
    if not isinstance(size, tuple | list) or len(size) != 2:
        raise ValueError(f"{what}: size must be (width, height), got {size!r}")
    w, h = size
    _int_in(f"{what} width", w, 1, 2**31 - 1)
    _int_in(f"{what} height", h, 1, 2**31 - 1)
    return int(w), int(h)


def plan_stylize(params: StyleParams, content_size: tuple[int, int], style_sizes: Sequence[tuple[int, int]], *,
                 network_modules: int | None = None) -> StylePlan:
    """Check that `stylize` can run these parameters on images of these sizes; ValueError saying why not.

    Pure (sizes only, no pixels), so a service can call it before accepting a job; `stylize` calls it
    too, so the two never disagree. Checks: the parameters themselves (StyleParams.check), one blend
    weight per style image, the layers against a feature network of `network_modules` modules (when
    given), and that at every multires level the image being optimised, and every style image that
    takes part (blend weight > 0, style_weight > 0) scaled to that level, keep both sides at least
    `min_side` of the layers used once scaled with their aspect ratio kept.
    """
    params.check()
    content_wh = _size_pair("content image", content_size)
    styles_wh = [_size_pair(f"style[{i}]", s) for i, s in enumerate(style_sizes)]
    blend = params.blend_weights(len(styles_wh))
    if network_modules is not None:
        missing = [n for n in (*params.content_layers, *params.style_layers) if layer_index(n) >= network_modules]
        if missing:
            raise ValueError(f"the feature network stops before layer(s) {missing}")
    c_layers = list(params.content_layers) if params.content_weight > 0 else []
    s_layers = list(params.style_layers) if params.style_weight > 0 else []
    used = [*c_layers, *s_layers]
    deepest = max(used, key=layer_index)
    x_min, s_min = min_side(used), min_side(s_layers)
    final = fit_size(*content_wh, params.size)
    levels = _level_sizes(final, params.multires)
    fix = "use a larger size" + (" or fewer multires levels" if params.multires > 1 else "")
    for k, level in enumerate(levels):
        at = (f"multires level {k + 1} of {len(levels)} (coarse to fine)" if len(levels) > 1
              else f"size {params.size}")
        if min(level) < x_min:
            raise ValueError(
                f"the content image ({content_wh[0]}x{content_wh[1]} px) is {level[0]}x{level[1]} px at {at}; the "
                f"feature layers up to {deepest} need at least {x_min} px on each side: {fix}, or a less "
                "elongated image")
        if not s_layers:
            continue  # style_weight 0: the style images are never fed to the network
        s_deepest = max(s_layers, key=layer_index)
        for i, ((sw, sh), b) in enumerate(zip(styles_wh, blend, strict=True)):
            w, h = fit_size(sw, sh, max(level))
            if b > 0 and min(w, h) < s_min:  # a style with blend weight 0 is never fed to the network
                raise ValueError(
                    f"style[{i}] ({sw}x{sh} px) is scaled to {w}x{h} px at {at}; the style layers up to {s_deepest} "
                    f"need at least {s_min} px on each side: {fix}, or a less elongated style image")
    return StylePlan(final, tuple(levels), tuple(_split_steps(params.steps, params.multires)), tuple(blend), x_min)


def stylize(content: Image.Image, styles: Sequence[Image.Image], params: StyleParams, features: VGGFeatures,
            device: torch.device, progress: ProgressFn | None = None, *,
            amp: torch.dtype | Literal["auto"] | None = "auto") -> Image.Image:
    """Restyle `content` with `styles` (Gatys et al.); returns an RGB image whose longest side is params.size.

    `progress(info)` runs after every step; returning False stops the run with StyleCancelled.
    `amp`: autocast dtype for the feature network ("auto": bf16 on CUDA, none on CPU).
    """
    plan = plan_stylize(params, content.size, [s.size for s in styles], network_modules=len(features.layers))
    amp_dtype = _default_amp(device) if amp == "auto" else amp
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes for hundreds of steps: tuning pays off
    prepare_features(features, device)  # a no-op after the first job
    weighted = [(s, w) for s, w in zip(styles, plan.blend, strict=True) if w > 0]
    sizes, per_level = plan.levels, plan.steps
    gen = torch.Generator().manual_seed(params.seed)
    x: Tensor | None = None
    done = 0
    level: _Level | None = None
    for k, (size, n_steps) in enumerate(zip(sizes, per_level, strict=True)):
        level = _Level(content, weighted, size, params, features, device, amp_dtype)
        target_shape = level.content_image.shape
        if x is None:
            x = (level.content_image.clone() if params.init == "content"
                 else torch.rand(target_shape, generator=gen).to(device))
        else:  # coarse-to-fine: the previous level's result initialises this one
            x = F.interpolate(x, size=target_shape[-2:], mode="bilinear", align_corners=False).clamp(0, 1)
        x = x.detach().contiguous().requires_grad_(True)
        done, x = _optimise(level, x, n_steps, done, params, progress, k, len(sizes))
    assert level is not None and x is not None
    return to_pil(level.compose(x))


def _new_lbfgs(x: Tensor) -> CompactLBFGS:
    # torch.optim.LBFGS's iteration (lr 1, one evaluation per step, no line search, no tolerances: `steps`
    # decides when to stop) with one host synchronisation per step instead of 2 x history (models/lbfgs.py)
    return CompactLBFGS(x, lr=1.0, history=LBFGS_HISTORY)


def _optimise(level: _Level, x: Tensor, n_steps: int, done: int, params: StyleParams,
              progress: ProgressFn | None, k: int, levels: int) -> tuple[int, Tensor]:
    """Run n_steps evaluations on one level; returns the global step count and the best image evaluated."""
    lbfgs = _new_lbfgs(x) if params.optimizer == "lbfgs" else None
    adam = torch.optim.Adam([x], lr=params.lr) if params.optimizer == "adam" else None
    best_loss = math.inf
    best = x.detach().clamp(0, 1).clone()
    xc = best

    def closure() -> Tensor:
        nonlocal xc
        x.grad = None
        # the loss is that of the valid image clamp(x): for L-BFGS the variable itself is never
        # projected, because clamping it in place between iterations invalidates the curvature pairs
        # (s_k no longer is the step taken) and made 256 px runs diverge after ~150 steps
        xc = x.clamp(0, 1)
        total, c, s, tv = level.losses(xc)
        total.backward()
        return torch.stack([total.detach(), c.detach(), s.detach(), tv.detach()]).float()

    for _ in range(n_steps):
        # the step's one host synchronisation: the report (and, for L-BFGS, its curvature test)
        parts = lbfgs.evaluate(closure) if lbfgs is not None else closure().tolist()
        value = parts[0]
        if value < best_loss:
            best_loss = value
            best.copy_(xc.detach())
        if lbfgs is not None:
            if not math.isfinite(value) or value > RESTART_FACTOR * best_loss:
                # early overshoots of L-BFGS without line search (2-10x, while its curvature estimate
                # rests on one tiny step) are productive and left alone; a blow-up goes back to the
                # best point with a fresh memory
                with torch.no_grad():
                    x.copy_(best)
                lbfgs = None  # its memory goes before the fresh one's is taken
                lbfgs = _new_lbfgs(x)
            else:
                lbfgs.advance()
        else:
            assert adam is not None
            adam.step()
            with torch.no_grad():
                x.clamp_(0, 1)  # projected Adam: momentum must not drift pixels out of range
        done += 1
        if progress is not None:
            total, c, s, tv = parts
            info = ProgressInfo(done, params.steps, k + 1, levels, total, c, s, tv, lambda: to_pil(level.compose(best)))
            if progress(info) is False:
                raise StyleCancelled(done)
    return done, best
