"""IBOTHead: shapes, official parameter names, shared head, frozen weight norm, selected-token forwards."""

import copy

import pytest
import torch

from ibot.models.head import IBOTHead, build_head, head_kwargs, loss_patch_out_dim

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


def _assert_selected_tokens_match(head: IBOTHead) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[CLS], masked-patch and patch-mean forwards equal the official forward on every token; returns
    (tokens, cls logits, patch logits) of that forward."""
    tokens = torch.randn(3, 1 + 6, IN_DIM)
    cls, patch = head(tokens)
    mask = torch.rand(3, 6) < 0.5
    assert torch.allclose(head.forward_cls(tokens[:, 0]), cls, atol=1e-6)
    assert torch.allclose(head.forward_patch(tokens[:, 1:][mask]), patch[mask], atol=1e-6)
    assert torch.allclose(head.forward_patch_mean(tokens[:, 1:]), patch.mean(1), atol=1e-6)
    return tokens, cls, patch


@pytest.mark.parametrize("kwargs", [{}, {"shared_head": True}, {"bottleneck_dim": 0}, {"norm": "ln"}])
def test_selected_tokens_match_full_forward(kwargs: dict) -> None:
    head = _head(**kwargs)
    tokens, cls, patch = _assert_selected_tokens_match(head)


def test_build_head_follows_official_flags() -> None:
    cfg = {"out_dim": 64, "patch_out_dim": 48, "norm_last_layer": False, "shared_head": False}
    student, teacher = build_head(IN_DIM, cfg, teacher=False), build_head(IN_DIM, cfg, teacher=True)
    assert student.last_layer2 is not student.last_layer and student.last_layer.weight_g.requires_grad
    # teacher: shared_head_teacher defaults to True, norm_last_layer keeps the default True
    assert teacher.last_layer2 is teacher.last_layer and not teacher.last_layer.weight_g.requires_grad
    assert loss_patch_out_dim(cfg) == 64
    assert loss_patch_out_dim({**cfg, "shared_head_teacher": False}) == 48
    assert isinstance(build_head(IN_DIM, {"use_bn_in_head": True}, teacher=False).mlp[1], torch.nn.BatchNorm1d)


# -- head-sharing variants (paper Tab. 17) ----------------------------------------------------------
# Small head: in 8, hidden 16, bottleneck 4, out 10, patch out 6. By hand:
#   MLP = (8*16+16) + (16*16+16) + (16*4+4) = 144 + 272 + 68 = 484; its 3rd linear layer alone: 68
#   last_layer = 10*4 (weight_v) + 10 (weight_g) = 50; last_layer2 = 6*4 + 6 = 30
SMALL = {"out_dim": 10, "patch_out_dim": 6, "head_hidden_dim": 16}
SMALL_COUNTS = {  # variant -> (student, teacher) parameter counts
    "flags": (484 + 50 + 30, 484 + 50),  # official defaults: shared_head false, shared_head_teacher true
    "vanilla": (2 * 484 + 50 + 30, 2 * 484 + 50 + 30),
    "shared": (484 + 50, 484 + 50),
    "shared_partial": (484 + 68 + 50 + 30, 484 + 68 + 50 + 30),
    "semi_shared": (2 * 484 + 50 + 30, 484 + 50),
    "semi_shared_partial": (484 + 68 + 50 + 30, 484 + 50),
}


def _small(variant: str, teacher: bool) -> IBOTHead:
    """``build_head``'s head of ``variant`` with a 4-dim bottleneck (the official 256 is not a config key)."""
    torch.manual_seed(0)
    return IBOTHead(8, **{**head_kwargs({**SMALL, "head_sharing": variant}, teacher=teacher), "bottleneck_dim": 4})


@pytest.mark.parametrize("variant", sorted(SMALL_COUNTS))
def test_head_sharing_parameter_counts(variant: str) -> None:
    for teacher, expected in zip((False, True), SMALL_COUNTS[variant]):
        head = _small(variant, teacher)
        assert sum(p.numel() for p in head.parameters()) == expected, (variant, teacher)


def test_head_sharing_modules_and_names() -> None:
    vanilla = _small("vanilla", False)
    assert {k for k in vanilla.state_dict() if k.startswith("patch_mlp.")} == {
        f"patch_mlp.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")}
    assert vanilla.last_layer2 is not vanilla.last_layer and vanilla.patch_out_dim == 6
    partial = _small("shared_partial", False)
    assert {k for k in partial.state_dict() if k.startswith("patch_mlp.")} == {"patch_mlp.0.weight", "patch_mlp.0.bias"}
    assert partial.patch_mlp[0].in_features == 16 and partial.patch_mlp[0].out_features == 4
    shared = _small("shared", False)
    assert shared.last_layer2 is shared.last_layer and not hasattr(shared, "patch_mlp")
    # flags = official modules, names and init (the same random draws as before this option existed)
    torch.manual_seed(0)
    official = IBOTHead(8, 10, patch_out_dim=6, hidden_dim=16, bottleneck_dim=4)
    flags = _small("flags", False)
    assert official.state_dict().keys() == flags.state_dict().keys()
    assert all(torch.equal(v, flags.state_dict()[k]) for k, v in official.state_dict().items())
    # the patch MLP has the trunk's init
    assert torch.all(vanilla.patch_mlp[0].bias == 0) and not torch.equal(vanilla.patch_mlp[0].weight, vanilla.mlp[0].weight)


@pytest.mark.parametrize("shared_mlp_layers", [0, 1, 2])
@pytest.mark.parametrize("norm", [None, "ln"])
def test_separate_patch_mlp_selected_tokens_and_exact_mean(shared_mlp_layers: int, norm) -> None:
    """With a non-linear patch MLP tail the patch centre is still exact: token features are computed per
    token and only the (linear) output layer is moved after the mean; equals the official patch.mean(1)."""
    head = _head(shared_mlp_layers=shared_mlp_layers, norm=norm)
    with torch.no_grad():  # make the patch branch differ visibly from the [CLS] one
        for p in head.patch_mlp.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    tokens, cls, patch = _assert_selected_tokens_match(head)
    # the patch branch: shared prefix, own tail, normalise, last_layer2 (written out)
    x = tokens[:, 1:]
    for module in list(head.mlp)[:head._split]:
        x = module(x)
    x = torch.nn.functional.normalize(head.patch_mlp(x), dim=-1)
    assert torch.allclose(patch, head.last_layer2(x), atol=1e-6)
    assert not torch.allclose(patch, head.project_patch(head.features(tokens[:, 1:])), atol=1e-3)  # not the [CLS] MLP


def test_head_sharing_loss_patch_out_dim_and_bad_variant() -> None:
    cfg = {"out_dim": 64, "patch_out_dim": 48}
    expected = {"flags": 64, "vanilla": 48, "shared": 64, "shared_partial": 48, "semi_shared": 64,
                "semi_shared_partial": 64}
    for variant, dim in expected.items():
        assert loss_patch_out_dim({**cfg, "head_sharing": variant}) == dim, variant
    # flags still follows the two official flags; a variant overrides them
    assert loss_patch_out_dim({**cfg, "shared_head_teacher": False}) == 48
    assert loss_patch_out_dim({**cfg, "shared_head_teacher": True, "head_sharing": "vanilla"}) == 48
    with pytest.raises(ValueError, match="head_sharing"):
        build_head(IN_DIM, {"head_sharing": "half"}, teacher=False)
    with pytest.raises(ValueError, match="bottleneck_dim > 0"):
        IBOTHead(IN_DIM, OUT_DIM, bottleneck_dim=0, shared_mlp_layers=1)
