"""VISRegEncoder feature taps, checked against independent recomputations from timm blocks and hooks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.fixtures_models import tiny_encoder
from visreg_hub.models import POOLINGS, Projector


def block_outputs_by_hooks(model, images):
    """Raw outputs of every timm block (before any norm), captured with forward hooks on a plain timm call."""
    captured = []
    handles = [
        blk.register_forward_hook(lambda _m, _i, out: captured.append(out)) for blk in model.backbone.blocks
    ]
    try:
        model.backbone.forward_features(images)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def final_norm(model, tokens):
    """The backbone's final LayerNorm applied functionally (independent of the module's forward)."""
    norm = model.backbone.norm
    return F.layer_norm(tokens, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


@pytest.fixture(scope="module")
def model_and_images():
    model = tiny_encoder(depth=4, num_reg_tokens=2)
    images = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    return model, images


def test_tap_shapes(model_and_images):
    model, images = model_and_images
    dim = model.embed_dim
    expected = {"cls": dim, "cls_last2": 2 * dim, "cls_last4": 4 * dim, "mean_patch": dim}
    assert set(expected) == set(POOLINGS)
    with torch.no_grad():
        for pooling, width in expected.items():
            assert model(images, pooling=pooling).shape == (3, width)
            assert model.embedding_dim(pooling) == width
        assert model.forward_features(images).shape == (3, 1 + 2 + 49, dim)
        assert model.patch_tokens(images).shape == (3, 7, 7, dim)


def test_cls_is_first_token_after_final_norm(model_and_images):
    model, images = model_and_images
    with torch.no_grad():
        blocks = block_outputs_by_hooks(model, images)
        reference = final_norm(model, blocks[-1])[:, 0]
        torch.testing.assert_close(model(images, pooling="cls"), reference, rtol=0, atol=1e-6)
        torch.testing.assert_close(model(images), model.forward_features(images)[:, 0], rtol=0, atol=0)


@pytest.mark.parametrize("num_blocks", [2, 4])
def test_cls_last_k_concatenates_normed_cls_of_last_blocks(model_and_images, num_blocks):
    model, images = model_and_images
    with torch.no_grad():
        blocks = block_outputs_by_hooks(model, images)
        reference = torch.cat([final_norm(model, out)[:, 0] for out in blocks[-num_blocks:]], dim=-1)
        torch.testing.assert_close(
            model(images, pooling=f"cls_last{num_blocks}"), reference, rtol=0, atol=1e-5
        )


def test_mean_patch_excludes_cls_and_registers(model_and_images):
    model, images = model_and_images
    with torch.no_grad():
        normed = final_norm(model, block_outputs_by_hooks(model, images)[-1])
        prefix = 1 + model.config.num_reg_tokens
        reference = normed[:, prefix:].sum(dim=1) / (normed.shape[1] - prefix)
        torch.testing.assert_close(model(images, pooling="mean_patch"), reference, rtol=0, atol=1e-5)
        # including the registers would give a different vector: the test can tell them apart
        assert not torch.allclose(normed[:, 1:].mean(dim=1), reference, atol=1e-4)


def test_patch_grid_is_row_major_and_matches_timm_nchw_intermediates():
    model = tiny_encoder()
    images = torch.randn(2, 3, 28, 36)  # non-square: 7 x 9 grid tells rows from columns
    with torch.no_grad():
        grid = model.patch_tokens(images)
        assert grid.shape == (2, 7, 9, 32)
        timm_grid = model.backbone.forward_intermediates(
            images, indices=1, norm=True, intermediates_only=True
        )[0]
        torch.testing.assert_close(grid.permute(0, 3, 1, 2), timm_grid, rtol=0, atol=1e-6)
        tokens = model.forward_features(images)
        torch.testing.assert_close(grid[:, 2, 5], tokens[:, 1 + 2 * 9 + 5], rtol=0, atol=0)


def test_forward_intermediates_delegates_to_timm():
    model = tiny_encoder()
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(images, indices=[0, 1], output_fmt="NLC")
        blocks = block_outputs_by_hooks(model, images)
        assert len(intermediates) == 2
        for got, raw in zip(intermediates, blocks):
            torch.testing.assert_close(got, raw[:, 1:], rtol=0, atol=1e-6)
        torch.testing.assert_close(final, model.forward_features(images), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(images, output_fmt="NHWC")


def test_dynamic_img_size_accepts_other_resolutions_and_static_refuses():
    dynamic = tiny_encoder()
    with torch.no_grad():
        assert dynamic(torch.randn(1, 3, 40, 40)).shape == (1, 32)
    static = tiny_encoder(dynamic_img_size=False)
    with pytest.raises(ValueError, match="dynamic_img_size"):
        static(torch.randn(1, 3, 40, 40))


@pytest.mark.parametrize(
    ("images", "pooling", "error", "message"),
    [
        (torch.randn(1, 3, 30, 28), None, ValueError, "patch_size"),
        (torch.randn(1, 1, 28, 28), None, ValueError, "channels"),
        (torch.randn(3, 28, 28), None, ValueError, "B, C, H, W"),
        (torch.zeros(1, 3, 28, 28, dtype=torch.uint8), None, TypeError, "floating point"),
        (torch.randn(1, 3, 28, 28), "patch", ValueError, "patch_tokens"),
        (torch.randn(1, 3, 28, 28), "cls_last4", ValueError, "at least 4 blocks"),
        (torch.randn(1, 3, 28, 28), "gem", ValueError, "unknown pooling"),
    ],
)
def test_bad_inputs_are_rejected_with_a_fix(images, pooling, error, message):
    model = tiny_encoder()
    with pytest.raises(error, match=message):
        model(images, pooling=pooling)


def test_same_seed_same_weights_and_state_dict_uses_timm_keys():
    first, second = tiny_encoder(seed=3), tiny_encoder(seed=3)
    for (name_a, a), (name_b, b) in zip(
        first.backbone.state_dict().items(), second.backbone.state_dict().items()
    ):
        assert name_a == name_b
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert "cls_token" in first.backbone.state_dict()
    assert "pos_embed" in first.backbone.state_dict()


def test_projector_matches_functional_reference_and_mixes_views_in_batchnorm():
    projector = Projector(in_dim=8, hidden_dim=16, out_dim=4).train()
    features = torch.randn(3, 5, 8)  # 3 views, 5 samples
    out = projector(features)
    assert out.shape == (3, 5, 4)
    linears = [m for m in projector.mlp if isinstance(m, torch.nn.Linear)]
    norms = [m for m in projector.mlp if isinstance(m, torch.nn.BatchNorm1d)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(8, 16), (16, 16), (16, 4)]
    # reference: batch statistics over all 15 rows (views flattened), biased variance as in train-mode BN
    hidden = features.reshape(15, 8)
    for lin, bn in zip(linears[:2], norms):
        pre = hidden @ lin.weight.T + lin.bias
        mean, var = pre.mean(0), pre.var(0, unbiased=False)
        hidden = F.gelu((pre - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias)
    reference = (hidden @ linears[2].weight.T + linears[2].bias).reshape(3, 5, 4)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    assert projector(features[0]).shape == (5, 4)


def test_projector_defaults_relu_and_validation():
    default = Projector(in_dim=32)
    widths = [m.out_features for m in default.mlp if isinstance(m, torch.nn.Linear)]
    assert widths == [2048, 2048, 256]
    assert any(isinstance(m, torch.nn.GELU) for m in default.mlp)
    relu = Projector(in_dim=32, hidden_dim=8, out_dim=4, activation="relu")
    assert any(isinstance(m, torch.nn.ReLU) for m in relu.mlp)
    with pytest.raises(ValueError, match="activation"):
        Projector(in_dim=32, activation="tanh")
    with pytest.raises(ValueError, match="Projector expects"):
        relu(torch.randn(4, 31))


def test_projector_is_not_part_of_the_encoder():
    model = tiny_encoder()
    # every encoder parameter is a timm backbone parameter: no head to strip before release
    backbone_keys = {f"backbone.{key}" for key in model.backbone.state_dict()}
    assert set(model.state_dict()) == backbone_keys
    assert not any(isinstance(module, Projector) for module in model.modules())


def test_poolings_for_depth_lists_exactly_the_taps_an_encoder_of_that_depth_computes():
    from visreg_hub.models import poolings_for_depth

    assert poolings_for_depth(1) == ("cls", "mean_patch")
    assert poolings_for_depth(3) == ("cls", "cls_last2", "mean_patch")
    assert poolings_for_depth(4) == POOLINGS
    for depth in (1, 2, 4):
        model = tiny_encoder(depth=depth)
        images = torch.zeros(1, 3, 28, 28)
        for pooling in POOLINGS:
            if pooling in poolings_for_depth(depth):
                assert model(images, pooling=pooling).shape == (1, model.embedding_dim(pooling))
            else:
                with pytest.raises(ValueError, match="needs at least"):
                    model(images, pooling=pooling)
