"""Plain-PyTorch references for the parity tests: torchvision's VGG layout and the `lpips` package's formula.

Written out here rather than imported from torchvision or lpips: neither installs beside the CPU torch
wheel CI uses (they pull a CUDA torch), and a parity test that skips for want of a package checks
nothing. What is copied is each library's published structure, not its code paths:

* torchvision's ``vgg11/13/16/19``: ``features`` (Conv2d 3×3 pad 1, ReLU(inplace), …, MaxPool2d 2×2 after
  each block) — so state-dict keys are ``features.<index>.weight`` —, ``avgpool``, then ``classifier``
  0/3/6 (Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear); inputs normalised by ImageNet's mean/std.
* LPIPS v0.1 (Zhang et al. 2018, ``lpips.LPIPS(net='vgg')``): inputs in [-1, 1] scaled by its
  ScalingLayer (shift −.030, −.088, −.188; scale .458, .448, .450), VGG-16 relu1_2 … relu5_3, each unit-
  normalised over channels (norm + 1e-10), squared difference, a non-negative 1×1 conv per layer, the
  spatial mean, summed over layers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vgg_jax import models

TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
LPIPS_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")

# The lpips package's weights/v0.1/vgg.pth (0.1.4), read with torch.load(weights_only=True): per layer,
# (sum of the 1×1 weights, the first weight). vgg_jax/assets/lpips_vgg_v0.1.json must hold these numbers.
LPIPS_V01_VGG_WEIGHTS = (
    (6.925991535186768, 0.05011165887117386),
    (8.8583345413208, 0.039409372955560684),
    (17.515005111694336, 0.05793386325240135),
    (51.521324157714844, 0.05780801177024841),
    (47.03485107421875, 0.04268040508031845),
)


def conv_blocks(variant: str) -> list[int]:
    """Number of 3×3 convs in each of the five blocks of `variant` (torchvision has A, B, D, E)."""
    counts = [0] * 5
    for name in models.conv_layer_names(variant):
        counts[int(name[4]) - 1] += 1
    return counts


def torchvision_vgg(
    torch: Any,
    variant: str,
    *,
    width_multiplier: float = 1.0,
    fc_width: int = 4096,
    num_classes: int = 1000,
    window: int = 7,
    bias_std: float = 0.1,
) -> Any:
    """A VGG in torchvision's layout (module indices, so state-dict keys, as torchvision's), in eval mode.

    Weights: torchvision's init (Kaiming-normal fan-out convs, N(0, 0.01) linears); biases N(0, `bias_std`)
    rather than torchvision's zeros, so that a bias mix-up cannot hide.
    """
    nn = torch.nn
    widths = models.VGG(variant=variant, width_multiplier=width_multiplier).conv_widths()
    layers, channels = [], 3
    for count, width in zip(conv_blocks(variant), widths, strict=True):
        for _ in range(count):
            layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = width
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))

    class VGG(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(*layers)
            self.avgpool = nn.AdaptiveAvgPool2d((window, window))
            self.classifier = nn.Sequential(
                nn.Linear(channels * window * window, fc_width),
                nn.ReLU(True),
                nn.Dropout(),
                nn.Linear(fc_width, fc_width),
                nn.ReLU(True),
                nn.Dropout(),
                nn.Linear(fc_width, num_classes),
            )

        def forward(self, x: Any) -> Any:
            return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    net = VGG()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                module.bias.normal_(0.0, bias_std)
            elif isinstance(module, nn.Linear):
                module.weight.normal_(0.0, 0.01)
                module.bias.normal_(0.0, bias_std)
    return net.eval()


def normalise(torch: Any, images: np.ndarray, *, scale: float = 255.0) -> Any:
    """NHWC images in [0, `scale`] → torchvision's normalised NCHW float32 tensor."""
    x = np.asarray(images, np.float32) / scale
    x = (x - np.asarray(TORCHVISION_MEAN, np.float32)) / np.asarray(TORCHVISION_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def named_features(torch: Any, net: Any, x: Any) -> dict[str, Any]:
    """Every activation of `net.features` under vgg_jax's names (convB_I, reluB_I, poolB), NCHW tensors."""
    out, block, index = {}, 1, 1
    for module in net.features:
        x = module(x)
        if isinstance(module, torch.nn.Conv2d):
            name = f"conv{block}_{index}"
        elif isinstance(module, torch.nn.ReLU):
            name, index = f"relu{block}_{index}", index + 1
        else:
            name, block, index = f"pool{block}", block + 1, 1
        out[name] = x.clone()  # the ReLUs are in place: keep each pre-activation as it was
    return out


def to_nhwc(tensor: Any) -> np.ndarray:
    return tensor.detach().numpy().transpose(0, 2, 3, 1)


def gram(f: Any) -> Any:
    """(N, C, H, W) → (N, C, C): the sum of outer products over positions / (C·H·W) (Gatys et al.)."""
    n, c, h, w = f.shape
    flat = f.reshape(n, c, h * w)
    return flat @ flat.transpose(1, 2) / (c * h * w)


def lpips_distance(torch: Any, net: Any, lin_weights: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """LPIPS v0.1 (the lpips package's formula) of NHWC images `x`, `y` in [-1, 1] with `net` as the VGG-16 trunk."""

    def scaled(images: np.ndarray) -> Any:
        z = (np.asarray(images, np.float32) - np.asarray(LPIPS_SHIFT, np.float32)) / np.asarray(LPIPS_SCALE, np.float32)
        return torch.from_numpy(np.ascontiguousarray(z.transpose(0, 3, 1, 2)))

    def unit(f: Any) -> Any:
        return f / (torch.sqrt(torch.sum(f**2, dim=1, keepdim=True)) + 1e-10)

    with torch.no_grad():
        fx, fy = named_features(torch, net, scaled(x)), named_features(torch, net, scaled(y))
        total = 0
        for layer, weight in zip(LPIPS_LAYERS, lin_weights, strict=True):
            lin = torch.from_numpy(np.asarray(weight, np.float32).reshape(1, -1, 1, 1))
            difference = (unit(fx[layer]) - unit(fy[layer])) ** 2
            total = total + torch.nn.functional.conv2d(difference, lin).mean(dim=(2, 3))
    return total.reshape(-1).numpy()
