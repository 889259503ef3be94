"""What the module path does to a cell, as a training augmentation (kornia).

ELPV cells are clean, centred, evenly lit 300 x 300 crops. A cell that
`inspect` cuts from a module photo is none of those: the rectified grid is a
few pixels off (residual perspective, rotation, where the border is cut),
light falls off across the module, the lens is not in focus everywhere, the
sensor adds noise, and the cell came from a camera giving it 150-600 native
pixels. A network trained only on clean crops loses crack recall there
(issue 33: 0.70 to 0.50 on assembled modules). `ModulePath` draws each of
these distortions per cell with probability `p`, on [B, 1, H, W] batches in
[0, 1] on the training device.
"""

from __future__ import annotations

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import nn

NATIVE_PIXELS = (150, 600)  # cell sizes EL cameras give, in native pixels


class NativeResolution(nn.Module):
    """Resample some cells through a lower native resolution: down to a size
    drawn from NATIVE_PIXELS (if below the training size), and back up, as a
    camera that gave the cell fewer pixels would."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = images.shape[-1]
        low = NATIVE_PIXELS[0]
        chosen = torch.rand(len(images), device=images.device) < self.p
        if size <= low or not chosen.any():
            return images
        # one native size per batch: the resampling is one interpolate call
        native = int(torch.randint(low, size, (1,)).item())
        out = images.clone()
        small = F.interpolate(images[chosen], size=(native, native), mode="area")
        out[chosen] = F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)
        return out


class ModulePath(nn.Module):
    """Residual perspective and rotation of a few pixels, a jittered border cut,
    a light gradient across the cell, defocus blur, native resolution and
    sensor noise, each drawn per cell with probability p."""

    def __init__(self, p: float):
        super().__init__()
        self.ops = nn.Sequential(
            # a 60 x 10 grid fitted to a module a few pixels off: corners move ~2 % of the cell
            K.RandomPerspective(distortion_scale=0.04, p=p),
            K.RandomAffine(degrees=2.0, translate=(0.03, 0.03), scale=(0.97, 1.03), padding_mode="border", p=p),
            K.RandomLinearIllumination(gain=(0.05, 0.3), p=p),  # light falling off across the module
            K.RandomGaussianBlur(kernel_size=(5, 5), sigma=(0.1, 1.2), p=p),  # defocus
            NativeResolution(p),
            K.RandomGaussianNoise(std=0.02, p=p),  # sensor noise, about 5 grey levels
        )

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.ops(images).clamp_(0.0, 1.0)
