"""Backbone stages: each family's wrapper answers for its own stages and parameter groups, so a
new family plugs in with its wrapper alone; the two families' groups are what layer decay scaled
before the wrappers answered for themselves."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from pipeline.models.backbones import Backbone, create_backbone
from pipeline.models.folding import fuse_for_inference
from pipeline.models.stages import (
    BackboneSplitError,
    FeatureExtractor,
    StagedModule,
    num_stages,
    parameter_stages,
    split_backbone,
)
from pipeline.preprocessing import IMAGENET_MEAN, IMAGENET_STD, make_preprocessing


def _backbone(name: str) -> Backbone:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        return create_backbone(name, resolution=64)


def _shape(stages: list[list[nn.Parameter]], module: nn.Module) -> tuple[list[int], list[str]]:
    """Tensors per stage and the name of each stage's first tensor."""
    names = {id(p): name for name, p in module.named_parameters()}
    return [len(stage) for stage in stages], [names[id(stage[0])] for stage in stages]


# Read from the ladder of isinstance tests that the wrappers' methods replaced.
WHOLE = {
    "test_efficientnet": [3, 3, 6, 6, 13, 16],
    "efficientnet-b0": [3, 10, 26, 26, 39, 39, 52, 16],
    "test_resnet": [9, 6, 9, 12, 9],  # timm's group_matcher; no stages to split
}
TAIL_FROM_STAGE_2 = {
    "test_efficientnet": (5, [6, 13, 16], "blocks.2.0.conv_exp.weight"),
    "efficientnet-b0": (7, [26, 39, 39, 52, 16], "blocks.0._expand_conv.weight"),
}


@pytest.mark.parametrize("name", WHOLE)
def test_each_family_groups_its_parameters_as_before(name):
    backbone = _backbone(name)
    sizes, _ = _shape(parameter_stages(backbone.module), backbone.module)
    assert sizes == WHOLE[name]
    assert sum(sizes) == len(list(backbone.module.parameters()))


@pytest.mark.parametrize("name", TAIL_FROM_STAGE_2)
def test_each_family_splits_and_groups_its_tail_as_before(name):
    backbone = _backbone(name)
    stages, sizes, first = TAIL_FROM_STAGE_2[name]
    assert num_stages(backbone) == stages
    _, tail = split_backbone(backbone, 2)
    got_sizes, got_names = _shape(parameter_stages(tail), tail)
    assert (got_sizes, got_names[0]) == (sizes, first)


def test_a_module_of_no_family_is_one_stage():
    layer = nn.Linear(3, 2)
    assert parameter_stages(layer) == [[layer.weight, layer.bias]]


class _Blocks(StagedModule):
    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def parameter_stages(self) -> list[list[nn.Parameter]]:
        return [list(layer.parameters()) for layer in self.layers]


class _MadeUpFamily(FeatureExtractor):
    """A family the package has never seen: a stem and two stages of one convolution each."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.blocks = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 8, 3, stride=2, padding=1)])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.blocks[1](self.blocks[0](self.stem(images)))

    def stage_starts(self) -> list[int] | None:
        return [0, 1]

    def split_at(self, block: int) -> tuple[StagedModule, StagedModule]:
        return _Blocks(self.stem, *self.blocks[:block]), _Blocks(*self.blocks[block:])

    def parameter_stages(self) -> list[list[nn.Parameter]]:
        return [list(self.stem.parameters()), *[list(block.parameters()) for block in self.blocks]]


def test_a_new_family_splits_groups_and_folds_with_its_wrapper_alone():
    torch.manual_seed(0)
    module = _MadeUpFamily()
    preprocessing = make_preprocessing(32, IMAGENET_MEAN, IMAGENET_STD)
    backbone = Backbone("made_up", module, 8, preprocessing, "random", "random")
    assert num_stages(backbone) == 2
    _, tail = split_backbone(backbone, 1)
    assert parameter_stages(tail) == [[module.blocks[1].weight, module.blocks[1].bias]]
    assert [len(stage) for stage in parameter_stages(module)] == [4, 2, 2]
    with pytest.raises(BackboneSplitError, match="--train-from-stage 2: made_up has stages 0..1"):
        split_backbone(backbone, 2)
    # Folding asks nothing of the family: batch norm and the normalisation go into the stem.
    pixels = 255 * torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    scale, shift = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_STD, IMAGENET_MEAN))
    expected = module.eval()((pixels / 255 - shift) / scale)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the unfolded fallback warns
        folded = fuse_for_inference(module, preprocessing)
    assert not any(isinstance(layer, nn.BatchNorm2d) for layer in folded.modules())
    torch.testing.assert_close(folded(pixels), expected, rtol=1e-4, atol=1e-4)


def test_a_family_without_stages_says_which_backbone_cannot_be_split():
    with pytest.raises(BackboneSplitError, match="test_resnet has no stem and stage blocks to split"):
        num_stages(_backbone("test_resnet"))
