"""Models of the benchmark tasks: an MLP, CIFAR ResNets, a small Vision Transformer and a
character-level GPT.

The image models take ``(N, C, H, W)`` float images; :class:`CharGPT` takes ``(N, T)`` token ids. Every weight matrix FOP and K-FAC should see is an
``nn.Linear`` or ``nn.Conv2d`` module (attention is written with ``nn.Linear`` projections, not
``nn.MultiheadAttention``, so the optimizer's hooks see them). ``width`` scales each model so tests
can run them tiny.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MLP", "CharGPT", "CifarResNet", "VisionTransformer", "resnet18", "resnet32"]


class MLP(nn.Module):
    """Fully connected ReLU network on flattened images."""

    def __init__(self, in_features: int, num_classes: int, width: int = 256, depth: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        features = in_features
        for _ in range(depth):
            layers += [nn.Linear(features, width), nn.ReLU()]
            features = width
        layers.append(nn.Linear(features, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual connection.

    ``shortcut="conv"`` projects a changed shape with a 1x1 convolution (ResNet-18 style);
    ``shortcut="pad"`` subsamples and zero-pads channels, parameter-free (the CIFAR ResNet-32 of
    He et al., option A).
    """

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if shortcut == "conv":
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
                )
            else:
                self.shortcut = PadShortcut(planes - in_planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PadShortcut(nn.Module):
    """Parameter-free shortcut: spatial subsampling by ``stride`` and zero channels appended."""

    def __init__(self, extra_channels: int, stride: int) -> None:
        super().__init__()
        self.extra_channels = extra_channels
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.extra_channels // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra_channels - half))


class CifarResNet(nn.Module):
    """ResNet for 32x32 images: a 3x3 stem (no max-pool), stages of :class:`BasicBlock`."""

    def __init__(
        self,
        blocks_per_stage: tuple[int, ...],
        widths: tuple[int, ...],
        num_classes: int,
        in_channels: int = 3,
        shortcut: str = "conv",
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        stages = []
        in_planes = widths[0]
        for index, (blocks, planes) in enumerate(zip(blocks_per_stage, widths, strict=True)):
            stride = 1 if index == 0 else 2
            stage = []
            for block in range(blocks):
                stage.append(BasicBlock(in_planes, planes, stride if block == 0 else 1, shortcut))
                in_planes = planes
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        features = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1))


def resnet18(num_classes: int = 10, width: int = 64, in_channels: int = 3) -> CifarResNet:
    """ResNet-18 with the CIFAR 3x3 stem; ``width`` channels in the first stage (64 standard)."""
    return CifarResNet((2, 2, 2, 2), (width, 2 * width, 4 * width, 8 * width), num_classes, in_channels, "conv")


def resnet32(num_classes: int = 10, width: int = 16, in_channels: int = 3) -> CifarResNet:
    """The CIFAR ResNet-32 of He et al. (3 stages of 5 blocks, widths 16/32/64, option-A shortcuts)."""
    return CifarResNet((5, 5, 5), (width, 2 * width, 4 * width), num_classes, in_channels, "pad")


class Attention(nn.Module):
    """Multi-head self-attention with ``nn.Linear`` projections (``qkv`` and ``proj``); ``causal``:
    each position attends to itself and earlier positions only (a decoder)."""

    def __init__(self, dim: int, heads: int, causal: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"embedding dimension {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.causal = causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=self.causal)
        return self.proj(attended.transpose(1, 2).reshape(batch, tokens, dim))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: attention and a GELU MLP, each with a residual connection."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, causal: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, causal)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class VisionTransformer(nn.Module):
    """A small ViT: ``patch x patch`` patches embedded by an ``nn.Linear``, a class token, learned
    position embeddings, ``depth`` pre-norm blocks, a linear head on the class token."""

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 32,
        in_channels: int = 3,
        patch: int = 4,
        dim: int = 192,
        depth: int = 6,
        heads: int | None = None,
        mlp_ratio: int = 2,
    ) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not divisible by the patch size {patch}")
        self.patch = patch
        tokens = (image_size // patch) ** 2
        self.patch_embed = nn.Linear(in_channels * patch * patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(
            *(TransformerBlock(dim, heads or max(1, dim // 64), mlp_ratio) for _ in range(depth))
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        p = self.patch
        patches = x.reshape(batch, channels, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)
        tokens = self.patch_embed(patches.reshape(batch, (height // p) * (width // p), channels * p * p))
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1), tokens], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(tokens))[:, 0])


class CharGPT(nn.Module):
    """A GPT-style decoder on token ids ``(N, T)``, returning next-token logits ``(N, T, vocab)``.

    Token embedding (``nn.Embedding``: K-FAC/FOP give it curvature with a diagonal input factor),
    a learned position table (a bare parameter: the first-order fallback rule), ``depth`` pre-norm
    blocks of causal self-attention (``nn.Linear`` ``qkv`` and ``proj``) and a GELU MLP, a final
    layer norm and a linear head. The head is untied by default, so that it and the embedding each
    get their own Kronecker curvature; ``tied=True`` shares the head's weight with the token embedding
    (GPT-2, nanoGPT), which makes the pair one layer with the head's factors on the summed gradient
    (:class:`fop.layers.TiedHeadLayer`). Initialisation as GPT-2: normal(0, 0.02), residual projections scaled by
    ``1/sqrt(2 depth)``.
    """

    def __init__(
        self,
        vocab_size: int,
        context: int,
        dim: int = 128,
        depth: int = 2,
        heads: int | None = None,
        mlp_ratio: int = 4,
        tied: bool = False,
    ) -> None:
        super().__init__()
        self.context = context
        self.token_embed = nn.Embedding(vocab_size, dim)
        self.position = nn.Parameter(torch.zeros(context, dim))
        self.blocks = nn.Sequential(
            *(TransformerBlock(dim, heads or max(1, dim // 64), mlp_ratio, causal=True) for _ in range(depth))
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.position, std=0.02)
        for block in self.modules():
            if isinstance(block, TransformerBlock):
                for projection in (block.attn.proj, block.fc2):
                    nn.init.normal_(projection.weight, std=0.02 / (2 * depth) ** 0.5)
        if tied:
            self.head.weight = self.token_embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        length = tokens.shape[1]
        if length > self.context:
            raise ValueError(f"sequence of {length} tokens is longer than the context ({self.context})")
        x = self.token_embed(tokens) + self.position[:length]
        return self.head(self.norm(self.blocks(x)))


class PartwiseBatchNorm(nn.Module):
    """A ``BatchNorm1d/2d`` whose training-mode statistics come from each of ``parts`` consecutive
    parts of the batch separately, as if every part ran on its own process.

    FOP's halves formed by two processes (``torchrun --nproc-per-node 2``, the paper's setup) each
    normalise their half with that half's statistics; one process normalising the whole batch
    couples the halves' gradients through the shared mean and variance. With ``parts=2`` (parts of
    ``ceil(n/2)`` and ``floor(n/2)`` samples, FOP's split) a single process computes exactly what
    the two processes compute. The running statistics take the mean of the parts' updates, which is
    what averaging the processes' running statistics gives (the update is linear in the statistics).
    Evaluation mode is the wrapped module's own. Parameters and buffers are the wrapped module's.
    """

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm, parts: int = 2) -> None:
        super().__init__()
        if parts < 1:
            raise ValueError(f"parts must be >= 1, got {parts}")
        self.norm, self.parts = norm, parts

    def forward(self, x: Tensor) -> Tensor:
        norm = self.norm
        if not norm.training or self.parts == 1 or x.shape[0] < self.parts:
            return norm(x)
        running_mean, running_var = norm.running_mean, norm.running_var
        tracked = norm.track_running_stats and running_mean is not None and running_var is not None
        momentum = 0.0
        if tracked:  # the module's own rule for the update factor (torch's _BatchNorm.forward)
            assert norm.num_batches_tracked is not None
            norm.num_batches_tracked.add_(1)
            momentum = norm.momentum if norm.momentum is not None else 1.0 / float(norm.num_batches_tracked)
        # each part updates its own copy of the running statistics, as each process would; then their mean
        outputs, means, variances = [], [], []
        for part in x.split(-(-x.shape[0] // self.parts)):  # ceil: FOP's first half is the larger
            mean = running_mean.clone() if running_mean is not None and tracked else None
            var = running_var.clone() if running_var is not None and tracked else None
            outputs.append(F.batch_norm(part, mean, var, norm.weight, norm.bias, True, momentum, norm.eps))
            if mean is not None and var is not None:
                means.append(mean)
                variances.append(var)
        if running_mean is not None and running_var is not None and means:
            with torch.no_grad():
                running_mean.copy_(torch.stack(means).mean(0))
                running_var.copy_(torch.stack(variances).mean(0))
        return torch.cat(outputs)


def split_batch_norm(model: nn.Module, parts: int = 2) -> nn.Module:
    """``model`` with every ``BatchNorm1d/2d/3d`` wrapped in :class:`PartwiseBatchNorm` (in place)."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
            setattr(model, name, PartwiseBatchNorm(child, parts))
        else:
            split_batch_norm(child, parts)
    return model
