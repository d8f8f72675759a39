import pytest
import torch

from deepimage.models import get_model
from deepimage.models.dense import to_dense

CASES = [
    ("vgg16_deepimage", 64, {"width": 1 / 16}),
    ("vgg19_deepimage", 32, {"width": 1 / 16}),
    ("alexnet", 64, {"width": 1 / 16}),
    ("resnet18", 32, {"width": 1 / 8}),
]


@pytest.mark.parametrize(("name", "size", "kwargs"), CASES)
def test_fc_to_conv_gives_the_same_logits_at_the_crop_size(name, size, kwargs):
    torch.manual_seed(0)
    model = get_model(name, 7, image_size=size, **kwargs).eval()
    dense = to_dense(model)
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        expected = model(x)
        scores = dense.score_map(x)
        got = dense(x)
    assert scores.shape[2:] == (1, 1)  # one position: the centre crop itself
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("name", "size", "kwargs"), CASES)
def test_dense_on_a_larger_image_averages_the_crops_it_slides_over(name, size, kwargs):
    torch.manual_seed(0)
    model = get_model(name, 5, image_size=size, **kwargs).eval()
    dense = to_dense(model)
    x = torch.randn(2, 3, size * 2, size * 2)
    with torch.no_grad():
        scores = dense.score_map(x)
    assert scores.shape[:2] == (2, 5) and scores.shape[2] > 1 and scores.shape[3] > 1
    torch.testing.assert_close(dense(x), scores.mean(dim=(2, 3)))


def test_the_dense_net_shares_the_trained_weights():
    model = get_model("vgg16_deepimage", 3, image_size=32, width=1 / 16)
    dense = to_dense(model)
    assert dense.features is model.features
    first = dense.head[0]
    assert first.kernel_size == (1, 1) and first.in_channels == model.feature_shape[0]
    torch.testing.assert_close(first.weight.flatten(1), model.classifier[1].weight)
