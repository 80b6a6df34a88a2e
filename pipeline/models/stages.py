"""Each backbone family's model as the pipeline sees it: a feature map, stages to split at, and
its parameters in stages.

A family's wrapper (a :class:`FeatureExtractor`) answers for its own model where its stages
start, how it splits at one, and how its parameters group, so no code here or above asks which
family a module belongs to. :func:`split_backbone` and :func:`num_stages` check what a caller
asks against those answers; :func:`parameter_stages` is what layer decay scales.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from torch import nn

if TYPE_CHECKING:
    # efficientnet-pytorch has no type information: its classes are Any to the type checker.
    from efficientnet_pytorch import EfficientNet
    from efficientnet_pytorch.model import MBConvBlock

    from pipeline.models.backbones import Backbone

# A timm group matcher: a parameter name -> its group's sort key, or timm's dict of patterns.
GroupMatcher = Callable[[str], tuple[float, ...]] | dict[str, Any]


class BackboneSplitError(ValueError):
    """A backbone that cannot be split into frozen and trained stages as asked."""


class StagedModule(nn.Module):
    """A module whose parameters group into stages, the input side first."""

    def parameter_stages(self) -> list[list[nn.Parameter]]:
        """The parameters in stages: the stem, each stage of blocks, the head convolution with
        the last stage; one stage holding everything for a model without stages."""
        raise NotImplementedError


class TimmModel(Protocol):
    """What the pipeline calls on a timm model beyond nn.Module's methods: timm's architectures
    share no base class, and nn.Module types any other attribute ``Tensor | Module``."""

    pretrained_cfg: dict[str, Any]
    num_features: int

    def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...

    def reset_classifier(self, num_classes: int) -> None: ...


def as_timm(model: nn.Module) -> TimmModel:
    """``model`` as a :class:`TimmModel`: a cast, for models ``timm.create_model`` built (every
    one has these; the type checker cannot know it)."""
    return cast(TimmModel, model)


class FeatureExtractor(StagedModule):
    """A family's model seen as a feature-map extractor: forward(images (B, 3, R, R)) -> (B, C, h, w)."""

    def stage_starts(self) -> list[int] | None:
        """Index of the first block of each stage; None for a model with no stem and stage
        blocks to split."""
        raise NotImplementedError

    def split_at(self, block: int) -> tuple[StagedModule, StagedModule]:
        """(front, tail): the stem and the blocks before ``block``; the blocks from ``block`` on
        and the head convolution. Both share their tensors with this module."""
        raise NotImplementedError


def _grouped(target: nn.Module, matcher: GroupMatcher) -> list[list[nn.Parameter]]:
    """``target``'s parameters grouped by a timm group matcher, in the groups' order."""
    from timm.models import group_parameters

    params = dict(target.named_parameters())
    groups = group_parameters(target, matcher)
    return [[params[name] for name in groups[key]] for key in sorted(groups)]


def _efficientnet_pytorch_matcher(
    blocks: Iterable[MBConvBlock], stem: tuple[str, ...], block_prefix: str, head: tuple[str, ...]
) -> Callable[[str], tuple[float, ...]]:
    """A timm-style group matcher for efficientnet-pytorch parameter names: the stem, a group per
    stage (blocks from one channel change to the next, as ``stage_starts`` splits them), and
    the head convolution with the last stage (as timm groups its EfficientNets)."""
    stage_of, stage = [], -1
    for i, block in enumerate(blocks):
        stage += i == 0 or block._block_args.input_filters != block._block_args.output_filters
        stage_of.append(stage)
    pattern = re.compile(re.escape(block_prefix) + r"(\d+)\.")

    def match(name: str) -> tuple[float, ...]:
        if name.startswith(stem):
            return (0,)
        found = pattern.match(name)
        if found:
            return (1 + stage_of[int(found.group(1))],)
        return (1 + stage_of[-1], 99999) if name.startswith(head) and stage_of else (float("inf"),)

    return match


class EfficientNetPytorchFeatures(FeatureExtractor):
    """efficientnet-pytorch's model seen as a feature-map extractor.

    The classifier (``_fc``) is dropped: it would be a parameter outside the loss, which
    DistributedDataParallel refuses unless it searches the graph for unused parameters
    every step.
    """

    def __init__(self, model: EfficientNet) -> None:
        super().__init__()
        model._fc = nn.Identity()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.extract_features(images)  # (B, C, h, w)

    def stage_starts(self) -> list[int] | None:
        # efficientnet-pytorch keeps its blocks flat; a stage starts where a block changes the channel count.
        return [
            i
            for i, block in enumerate(self.model._blocks)
            if i == 0 or block._block_args.input_filters != block._block_args.output_filters
        ]

    def split_at(self, block: int) -> tuple[StagedModule, StagedModule]:
        return (
            _EfficientNetPytorchStages(self.model, 0, block),
            _EfficientNetPytorchStages(self.model, block, len(self.model._blocks)),
        )

    def parameter_stages(self) -> list[list[nn.Parameter]]:
        return _grouped(
            self,
            _efficientnet_pytorch_matcher(
                self.model._blocks,
                ("model._conv_stem.", "model._bn0."),
                "model._blocks.",
                ("model._conv_head.", "model._bn1."),
            ),
        )


class _EfficientNetPytorchStages(StagedModule):
    """Blocks ``[first, stop)`` of an efficientnet-pytorch model, with the stem when ``first``
    is 0 and the head convolution when ``stop`` is the last block: (B, C, h, w) -> (B, C', h', w').

    Drop-connect keeps its depth scaling by each block's index in the whole network.
    """

    def __init__(self, model: EfficientNet, first: int, stop: int) -> None:
        super().__init__()
        count = len(model._blocks)
        self.first, self.count = first, count
        self.drop_connect_rate = model._global_params.drop_connect_rate
        self.stem = nn.ModuleList([model._conv_stem, model._bn0]) if first == 0 else None
        self.blocks = nn.ModuleList(model._blocks[first:stop])
        self.head = nn.ModuleList([model._conv_head, model._bn1]) if stop == count else None
        self.swish = model._swish

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stem is not None:
            x = self.swish(self.stem[1](self.stem[0](x)))
        for offset, block in enumerate(self.blocks):
            rate = self.drop_connect_rate * (self.first + offset) / self.count if self.drop_connect_rate else None
            x = block(x, drop_connect_rate=rate)
        if self.head is not None:
            x = self.swish(self.head[1](self.head[0](x)))
        return x

    def parameter_stages(self) -> list[list[nn.Parameter]]:
        return _grouped(self, _efficientnet_pytorch_matcher(self.blocks, ("stem.",), "blocks.", ("head.",)))


class TimmFeatures(FeatureExtractor):
    """A timm model seen as a feature-map extractor (classifier and pooling unused).

    Every output becomes (B, C, h, w), the layout ``pool_features`` pools: a channels-last
    map (``output_fmt`` NHWC: Swin, MambaOut) is permuted, and the tokens (B, N, C) of a
    vision transformer become (B, C, N', 1) without the class and register tokens, so the
    pooling averages and maxes over the patch tokens.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.channels_last = getattr(model, "output_fmt", "NCHW") == "NHWC"
        self.prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = as_timm(self.model).forward_features(images)
        if features.ndim == 3:  # tokens (B, N, C)
            return features[:, self.prefix_tokens :].transpose(1, 2).unsqueeze(-1)  # (B, C, N', 1)
        if self.channels_last:  # (B, h, w, C)
            return features.permute(0, 3, 1, 2)
        return features  # (B, C, h, w)

    def stage_starts(self) -> list[int] | None:
        # An EfficientNet-style model (EfficientNet and MobileNet families): each of ``blocks`` is a stage.
        # Its stages are sliced, so ``blocks`` is a sequence of them (as in every timm family with a stem).
        if all(isinstance(getattr(self.model, name, None), nn.Module) for name in ("conv_stem", "bn1")) and isinstance(
            getattr(self.model, "blocks", None), nn.Sequential
        ):
            return list(range(len(_timm_blocks(self.model))))
        return None

    def split_at(self, block: int) -> tuple[StagedModule, StagedModule]:
        return _TimmStages(self.model, 0, block), _TimmStages(self.model, block, len(_timm_blocks(self.model)))

    def parameter_stages(self) -> list[list[nn.Parameter]]:
        # timm's own coarse grouping (``group_matcher``, as its layer-decay optimisers use).
        group_matcher = getattr(self.model, "group_matcher", None)
        if group_matcher is not None:
            return _grouped(self.model, group_matcher(coarse=True))
        return [list(self.parameters())]


def _timm_blocks(model: nn.Module) -> nn.Sequential:
    """A timm EfficientNet-style model's ``blocks``: the sequence of its stages."""
    blocks = model.get_submodule("blocks")
    if not isinstance(blocks, nn.Sequential):
        raise BackboneSplitError(
            f"{type(model).__name__}.blocks is a {type(blocks).__name__}, not the sequence of stages it is split at"
        )
    return blocks


class _TimmStages(StagedModule):
    """Stages ``[first, stop)`` of a timm EfficientNet-style model (``conv_stem``, ``bn1``, a
    ``blocks`` sequence of stages, then ``conv_head`` and ``bn2`` when it has them), with the
    stem when ``first`` is 0 and the head convolution when ``stop`` is the last stage."""

    def __init__(self, model: nn.Module, first: int, stop: int) -> None:
        super().__init__()
        self.stem = (
            nn.Sequential(model.get_submodule("conv_stem"), model.get_submodule("bn1")) if first == 0 else nn.Identity()
        )
        blocks = _timm_blocks(model)
        self.blocks = blocks[first:stop]
        # EfficientNet's forward_features ends with conv_head + bn2; MobileNetV3's ends at the blocks.
        last = stop == len(blocks) and isinstance(getattr(model, "bn2", None), nn.Module)
        self.head = (
            nn.Sequential(model.get_submodule("conv_head"), model.get_submodule("bn2")) if last else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))

    def parameter_stages(self) -> list[list[nn.Parameter]]:
        return _grouped(self, {"stem": r"^stem\.", "blocks": [(r"^blocks\.(\d+)", None), (r"^head\.", (99999,))]})


def _stage_starts(backbone: Backbone) -> tuple[FeatureExtractor, list[int]]:
    """The backbone's module and where its stages start; a module that is no family's wrapper
    (one split already) has none."""
    if isinstance(backbone.module, FeatureExtractor):
        starts = backbone.module.stage_starts()
        if starts is not None:
            return backbone.module, starts
    raise BackboneSplitError(
        "--mode partial needs an EfficientNet-style backbone (timm's EfficientNet and MobileNet families, "
        f"or efficientnet-b0, efficientnet-b1...); {backbone.name} has no stem and stage blocks to split"
    )


def num_stages(backbone: Backbone) -> int:
    """Stages of the backbone that ``split_backbone`` can split at."""
    return len(_stage_starts(backbone)[1])


@torch.no_grad()
def split_backbone(backbone: Backbone, stage: int) -> tuple[nn.Module, nn.Module]:
    """(front, tail) with ``tail(front(x)) == backbone.module(x)``: the front is the stem and
    stages ``0 .. stage-1``, the tail the other stages and the head convolution.

    Both share their tensors with ``backbone.module``, so training the tail trains the
    backbone. The split is checked on a random batch.
    """
    module, starts = _stage_starts(backbone)
    if not 1 <= stage < len(starts):
        raise BackboneSplitError(
            f"--train-from-stage {stage}: {backbone.name} has stages 0..{len(starts) - 1}; choose 1..{len(starts) - 1} "
            "(0 is --mode finetune)"
        )
    front, tail = module.split_at(starts[stage])
    was_training = module.training
    module.eval()
    probe = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    expected, got = module(probe), tail(front(probe))
    module.train(was_training)
    if expected.shape != got.shape or not torch.allclose(expected, got, rtol=1e-4, atol=1e-4):
        raise BackboneSplitError(
            f"--mode partial: {backbone.name} does not run as stem, stages and head in order; "
            "use --mode frozen or finetune"
        )
    return front, tail


def parameter_stages(module: nn.Module) -> list[list[nn.Parameter]]:
    """The parameters of a backbone's module (or of ``split_backbone``'s tail) in stages, the
    input side first (:meth:`StagedModule.parameter_stages`); one stage holding everything for
    any other module."""
    if isinstance(module, StagedModule):
        return module.parameter_stages()
    return [list(module.parameters())]
