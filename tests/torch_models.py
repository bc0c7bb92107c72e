"""Plain-torch reference models for the conversion tests, written independently of ours.

``TorchResNet`` has torchvision's module names (so its ``state_dict`` keys are torchvision's)
but any block counts and widths; ``TorchProtoMask`` follows the reference's forward pass
(1x1 conv -> average pool -> sigmoid -> squared L2 by convolutions -> min over views ->
log similarity -> linear) and state_dict layout (reference doc §3, §12).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class TorchBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(in_channels, planes, stride)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(y + shortcut)


class TorchBottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = _downsample(in_channels, planes * 4, stride)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(y + shortcut)


def _downsample(in_channels: int, out_channels: int, stride: int):
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
    )


class TorchResNet(nn.Module):
    """ResNet feature extractor (no fc), NCHW."""

    def __init__(self, block: str, blocks_per_stage, widths, stem_width: int):
        super().__init__()
        block_cls = TorchBasicBlock if block == "basic" else TorchBottleneck
        self.conv1 = nn.Conv2d(3, stem_width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_channels = stem_width
        for stage, (count, planes) in enumerate(zip(blocks_per_stage, widths, strict=True)):
            blocks = []
            for index in range(count):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(block_cls(in_channels, planes, stride))
                in_channels = planes * block_cls.expansion
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.num_stages = len(widths)
        self.out_channels = in_channels

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for stage in range(self.num_stages):
            x = getattr(self, f"layer{stage + 1}")(x)
        return x


def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Random conv weights and random BatchNorm affine parameters and running statistics."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.Conv2d):
                fan_in = sub.weight[0].numel()
                sub.weight.copy_(torch.randn(sub.weight.shape, generator=generator) / fan_in**0.5)
            elif isinstance(sub, nn.BatchNorm2d):
                shape = sub.weight.shape
                sub.weight.copy_(1 + 0.2 * torch.randn(shape, generator=generator))
                sub.bias.copy_(0.2 * torch.randn(shape, generator=generator))
                sub.running_mean.copy_(0.2 * torch.randn(shape, generator=generator))
                sub.running_var.copy_(0.5 + torch.rand(shape, generator=generator))
    return module.eval()


class TorchProtoMask(nn.Module):
    """The reference's ProtoMask forward with its state_dict names."""

    def __init__(self, backbone: TorchResNet, num_classes: int, ppc: int, dim: int, eps: float):
        super().__init__()
        self.backbone = backbone
        self.add_on_layers = nn.Sequential(nn.Conv2d(backbone.out_channels, dim, 1))
        self.prototype_vectors = nn.Parameter(torch.rand(num_classes * ppc, dim, 1, 1))
        self.last_layer = nn.Linear(num_classes * ppc, num_classes, bias=False)
        self.classification_loss_fn = nn.CrossEntropyLoss(weight=torch.rand(num_classes) + 0.5)
        self.eps = eps

    def forward(self, views):
        """views ``[B, K, 3, H, W]`` -> (logits ``[B, C]``, min distances ``[B, P]``)."""
        batch, num_views = views.shape[:2]
        x = self.backbone(views.flatten(0, 1))
        z = torch.sigmoid(F.adaptive_avg_pool2d(self.add_on_layers(x), 1))  # [BK, D, 1, 1]
        p = self.prototype_vectors
        z_sq = F.conv2d(z**2, torch.ones_like(p))
        cross = F.conv2d(z, p)
        p_sq = (p**2).sum(dim=(1, 2, 3)).view(1, -1, 1, 1)
        distances = F.relu(z_sq - 2 * cross + p_sq).view(batch, num_views, -1)
        min_distances = distances.min(dim=1).values
        similarity = torch.log((min_distances + 1) / (min_distances + self.eps))
        return self.last_layer(similarity), min_distances
