import pytest
import torch
from torch import nn

from deepimage.models import get_model
from deepimage.models.common import fc_head
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


class _Unpadded(nn.Module):
    """A VGG-style classifier without padding: every score-map position sees exactly one
    ``CROP x CROP`` window of the image, so dense evaluation can be compared with crops."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3), nn.ReLU(),
            nn.MaxPool2d(2),
        )  # fmt: skip
        self.feature_shape = (8, 3, 3)  # a 20 x 20 crop: 18, 9, 7, 3
        self.classifier = fc_head(8 * 3 * 3, 16, num_classes, dropout=0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


CROP, STRIDE = 20, 4  # the trunk's input window and total stride


def test_dense_on_a_larger_image_averages_the_crops_it_slides_over():
    """On a 32 x 36 image the dense net scores the 4 x 5 crops at offsets 0, 4, 8, ... and
    averages them: each position equals the model run on that crop alone."""
    torch.manual_seed(0)
    model = _Unpadded(5).eval()
    dense = to_dense(model)
    x = torch.randn(2, 3, 32, 36)
    with torch.no_grad():
        scores = dense.score_map(x)
        got = dense(x)
        crops = {
            (i, j): model(x[:, :, i * STRIDE : i * STRIDE + CROP, j * STRIDE : j * STRIDE + CROP])
            for i in range(4)
            for j in range(5)
        }
    assert scores.shape == (2, 5, 4, 5)
    for (i, j), logits in crops.items():
        torch.testing.assert_close(scores[:, :, i, j], logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, torch.stack(list(crops.values())).mean(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("name", "size", "kwargs"), CASES)
def test_dense_on_a_larger_image_gives_one_score_per_crop_position(name, size, kwargs):
    torch.manual_seed(0)
    model = get_model(name, 5, image_size=size, **kwargs).eval()
    with torch.no_grad():
        scores = to_dense(model).score_map(torch.randn(2, 3, size * 2, size * 2))
    assert scores.shape[:2] == (2, 5) and scores.shape[2] > 1 and scores.shape[3] > 1


def test_the_dense_net_shares_the_trained_weights():
    model = get_model("vgg16_deepimage", 3, image_size=32, width=1 / 16)
    dense = to_dense(model)
    assert dense.features is model.features
    first = dense.head[0]
    assert first.kernel_size == (1, 1) and first.in_channels == model.feature_shape[0]
    torch.testing.assert_close(first.weight.flatten(1), model.classifier[1].weight)
