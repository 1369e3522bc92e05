"""``fmnist_bnn``: a small Fashion-MNIST BNN, the end-to-end spine of bnnc.

Real-valued first conv and classifier; binary 3×3 convs with sign/STE activations and XNOR (mean-abs)
weight scales, each followed by BatchNorm; max pooling. Channel counts 48 and 80 are deliberately not
multiples of 32, so every run exercises the packed tail words.
"""

from __future__ import annotations

from torch import nn

from bnnc.nn import BinaryConv2d

from ._registry import Recipe, register

FMNIST_RECIPE = Recipe(
    dataset="fashion-mnist",
    input_shape=(1, 1, 28, 28),
    epochs=4,
    batch_size=128,
    optimizer="adam",
    lr=2e-3,
    schedule="cosine",
    source="bnnc (this repo); a 4-layer sign/STE BNN reaches ~0.87 top-1 in 4 epochs",
)


class FashionMNISTBNN(nn.Module):
    def __init__(self, channels=(32, 48, 64, 80), num_classes=10, weight_quantizer="xnor",
                 input_quantizer="sign"):
        super().__init__()
        c0, c1, c2, c3 = channels
        self.stem = nn.Sequential(nn.Conv2d(1, c0, 3, padding=1, bias=False), nn.BatchNorm2d(c0), nn.MaxPool2d(2))
        wq, aq = weight_quantizer, input_quantizer
        self.features = nn.Sequential(
            BinaryConv2d(c0, c1, 3, padding=1, weight_quantizer=wq, input_quantizer=aq), nn.BatchNorm2d(c1), nn.MaxPool2d(2),
            BinaryConv2d(c1, c2, 3, padding=1, weight_quantizer=wq, input_quantizer=aq), nn.BatchNorm2d(c2),
            BinaryConv2d(c2, c3, 3, padding=1, weight_quantizer=wq, input_quantizer=aq), nn.BatchNorm2d(c3), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c3 * 3 * 3, num_classes))

    def forward(self, x):
        return self.classifier(self.features(self.stem(x)))


@register("fmnist_bnn", FMNIST_RECIPE)
def fmnist_bnn(**kwargs) -> nn.Module:
    return FashionMNISTBNN(**kwargs)
