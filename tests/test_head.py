"""IBOTHead: shapes, official parameter names, shared head, frozen weight norm, selected-token forwards."""

import copy

import pytest
import torch

from ibot.models.head import IBOTHead, build_head, loss_patch_out_dim

IN_DIM, OUT_DIM, PATCH_DIM = 32, 64, 48


def _head(**kwargs) -> IBOTHead:
    torch.manual_seed(0)
    kwargs = {"hidden_dim": 40, "bottleneck_dim": 16, **kwargs}
    return IBOTHead(IN_DIM, OUT_DIM, patch_out_dim=PATCH_DIM, **kwargs)


def test_shapes() -> None:
    head = _head()
    cls, patch = head(torch.randn(3, 1 + 5, IN_DIM))
    assert cls.shape == (3, OUT_DIM) and patch.shape == (3, 5, PATCH_DIM)
    assert head(torch.randn(3, IN_DIM)).shape == (3, OUT_DIM)
    assert head.patch_out_dim == PATCH_DIM


def test_official_parameter_names() -> None:
    names = set(_head().state_dict())
    assert names == {
        "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight", "mlp.4.bias",
        "last_layer.weight_g", "last_layer.weight_v", "last_layer2.weight_g", "last_layer2.weight_v",
    }
    # official shape conventions (paper sizes)
    head = IBOTHead(384, 8192)
    sd = head.state_dict()
    assert sd["mlp.0.weight"].shape == (2048, 384) and sd["mlp.4.weight"].shape == (256, 2048)
    assert sd["last_layer.weight_g"].shape == (8192, 1) and sd["last_layer2.weight_v"].shape == (8192, 256)


def test_init() -> None:
    head = _head()
    for index in (0, 2, 4):
        layer = head.mlp[index]
        # trunc_normal_(std=.02) truncates at +-2 absolute (as official), i.e. a plain N(0, .02^2)
        assert torch.all(layer.bias == 0)
        assert abs(layer.weight.std().item() - 0.02) < 0.004


def test_norm_last_layer_freezes_unit_gain() -> None:
    frozen, free = _head(norm_last_layer=True), _head(norm_last_layer=False)
    for layer in (frozen.last_layer, frozen.last_layer2):
        assert torch.all(layer.weight_g == 1) and not layer.weight_g.requires_grad
    for layer in (free.last_layer, free.last_layer2):
        assert torch.all(layer.weight_g == 1) and layer.weight_g.requires_grad
    # unit gain: output rows are cosine similarities of unit vectors
    assert torch.allclose(frozen.last_layer.weight.norm(dim=1), torch.ones(OUT_DIM), atol=1e-5)


def test_fresh_head_deep_copies_to_an_equal_head() -> None:
    head = _head(shared_head=True)
    copied = copy.deepcopy(head)  # e.g. building the teacher from the student
    assert copied.last_layer2 is copied.last_layer
    tokens = torch.randn(2, 4, IN_DIM)
    assert all(torch.equal(a, b) for a, b in zip(head(tokens), copied(tokens)))


def test_shared_head() -> None:
    head = _head(shared_head=True)
    assert head.last_layer2 is head.last_layer and head.patch_out_dim == OUT_DIM
    cls, patch = head(torch.randn(2, 4, IN_DIM))
    assert patch.shape == (2, 3, OUT_DIM)
    # the alias is saved under both names, like the official teacher checkpoints
    sd = head.state_dict()
    assert torch.equal(sd["last_layer2.weight_v"], sd["last_layer.weight_v"])
    assert len(list(head.parameters())) == 8


@pytest.mark.parametrize("kwargs", [{}, {"shared_head": True}, {"bottleneck_dim": 0}, {"norm": "ln"}])
def test_selected_tokens_match_full_forward(kwargs: dict) -> None:
    head = _head(**kwargs)
    tokens = torch.randn(3, 1 + 6, IN_DIM)
    cls, patch = head(tokens)
    mask = torch.rand(3, 6) < 0.5
    assert torch.allclose(head.forward_cls(tokens[:, 0]), cls, atol=1e-6)
    assert torch.allclose(head.forward_patch(tokens[:, 1:][mask]), patch[mask], atol=1e-6)
    assert torch.allclose(head.forward_patch_mean(tokens[:, 1:]), patch.mean(1), atol=1e-6)


def test_build_head_follows_official_flags() -> None:
    cfg = {"out_dim": 64, "patch_out_dim": 48, "norm_last_layer": False, "shared_head": False}
    student, teacher = build_head(IN_DIM, cfg, teacher=False), build_head(IN_DIM, cfg, teacher=True)
    assert student.last_layer2 is not student.last_layer and student.last_layer.weight_g.requires_grad
    # teacher: shared_head_teacher defaults to True, norm_last_layer keeps the default True
    assert teacher.last_layer2 is teacher.last_layer and not teacher.last_layer.weight_g.requires_grad
    assert loss_patch_out_dim(cfg) == 64
    assert loss_patch_out_dim({**cfg, "shared_head_teacher": False}) == 48
    assert isinstance(build_head(IN_DIM, {"use_bn_in_head": True}, teacher=False).mlp[1], torch.nn.BatchNorm1d)
