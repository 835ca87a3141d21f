"""CIFAR ResNet shapes and parameter counts against He et al. 2016 (Table 6)."""

from __future__ import annotations

import pytest
import torch

from models.cifar_resnet import cifar_resnet, count_parameters


@pytest.mark.parametrize(("depth", "paper_millions"), [(20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85), (110, 1.7)])
def test_parameter_counts_match_the_paper(depth: int, paper_millions: float) -> None:
    n = count_parameters(cifar_resnet(depth))
    assert round(n / 1e6, 2 if depth < 110 else 1) == paper_millions


def test_exact_counts_option_a_and_b() -> None:
    assert count_parameters(cifar_resnet(20, shortcut="A")) == 269_722
    assert count_parameters(cifar_resnet(56, shortcut="A")) == 853_018
    # option B adds two 1x1 projections with batch norm: 16*32+2*32 + 32*64+2*64
    assert count_parameters(cifar_resnet(20, shortcut="B")) == 269_722 + 576 + 2176


@pytest.mark.parametrize("depth", [8, 20, 32])
def test_layer_count_and_output_shape(depth: int) -> None:
    m = cifar_resnet(depth, num_classes=7)
    convs = [x for x in m.modules() if isinstance(x, torch.nn.Conv2d)]
    fcs = [x for x in m.modules() if isinstance(x, torch.nn.Linear)]
    assert len(convs) + len(fcs) == depth  # 6n+2 weighted layers with parameter-free shortcuts
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_bad_depth_rejected() -> None:
    with pytest.raises(ValueError):
        cifar_resnet(21)
