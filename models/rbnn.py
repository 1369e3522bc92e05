"""RBNN CIFAR-10 models (Rotated Binary Neural Network, Lin et al., NeurIPS 2020; ``shared/spec/methods.md`` §6).

Every binary conv uses the ``rbnn`` quantizers (:class:`bnnc.quantizers.RBNNActivation`,
:class:`bnnc.quantizers.RBNNWeight`): per-sample standardised activations, rotated standardised weights,
learnable per-channel ``alpha`` and ``rotate`` θ, rotation buffers ``R1``/``R2`` (sized here at
construction, so published state dicts load strictly). Topologies (lmbxmu/RBNN ``cifar/models_cifar``, §6.4):

* ``rbnn_resnet20_1w1a`` (resnet.py): stem real conv3×3 (3→16) → BN → Hardtanh; standard blocks
  h = Hardtanh(BN1(conv1(x))), y = Hardtanh(BN2(conv2(h)) + SC(x)), SC option A; head GAP → BN1d(64) →
  Linear. Init kaiming_normal Conv/Linear, every BN2d weight 1e−8 and bias 0.
* ``rbnn_resnet20_bireal_1w1a`` (resnet_bireal.py): the same with Bi-Real blocks
  h = Hardtanh(BN1(conv1(x)) + SC(x)), y = Hardtanh(BN2(conv2(h)) + h).
* ``rbnn_resnet18_1w1a`` (resnet2.py): widths 64/128/256/512 × [2, 2, 2, 2]; stem conv3×3 → BN, no
  activation; standard blocks; downsampling shortcut = BINARY conv1×1 stride 2 + BN (``shortcut.0/1``);
  head GAP → BN1d(512) → Linear. PyTorch default init.
* ``rbnn_vgg_small_1w1a`` (vgg.py): the VGG-small of :class:`bnnc.models.irnet.CifarVGGSmall`.

Checkpoints (§6.5): ``torch.save({'epoch', 'model', 'state_dict', 'best_prec1', 'parameters'})``, keys without
(or, from DataParallel, with) ``module.``; per binary conv ``<p>.{weight, alpha, rotate, R1, R2}``, which
this model holds as ``<p>.weight`` and ``<p>.weight_quantizer.{alpha, rotate, R1, R2}`` (one rename).

Export: RBNN activations binarise x − mean(x) over (C, H, W) of each sample; the export form computes the
centring with standard ONNX ops (ReduceMean in float64 → Sub) before ``SignBinarize`` with threshold 0, so
ties at the mean agree on every runtime and the binary convs deploy bit-packed.
"""

from __future__ import annotations

from torch import nn

from bnnc.checkpoints.mapping import ModelMapping, register_mapping
from bnnc.quantizers import RBNNActivation, RBNNWeight

from ._registry import Recipe, register
from .irnet import _CIFAR_COMMON, CifarResNet, CifarVGGSmall

__all__ = ["RBNN_CIFAR10_RECIPE", "RBNN_MAPPING", "rbnn_resnet20_1w1a", "rbnn_resnet20_bireal_1w1a",
           "rbnn_resnet18_1w1a", "rbnn_vgg_small_1w1a", "materialize_rbnn"]

_SOURCE = ("RBNN (Lin et al., NeurIPS 2020), lmbxmu/RBNN cifar/ (main.py, run.sh, utils/options.py; "
           "methods.md §6.3)")

RBNN_CIFAR10_RECIPE = Recipe(
    dataset="cifar10",
    input_shape=(1, 3, 32, 32),
    epochs=1000,
    batch_size=256,
    optimizer="sgd",
    lr=0.1,
    weight_decay=1e-4,
    schedule="cosine",
    source=f"{_SOURCE}; published resnet20_1w1a: 86.5 % top-1 (RBNN readme)",
    extra={
        **_CIFAR_COMMON,
        "published_top1": 86.5,
        "test_batch_size": 128,
        "warmup_epochs": 5,
        "warmup": "lr·(e+1)/5 for e < 5, then CosineAnnealingLR(T_max = epochs − 4) stepped for e ≥ 4 "
                  "(last_epoch starts at −5: the LR never quite reaches 0)",
        "cosine_t_max": 1000 - 4,
        "tk_schedule": "log_up(t_min=1e-2, t_max=10), k = max(1/t, 1), per epoch (cpt_tk)",
        "rotation_update": 1,
        "seed": 1234,
    },
)


def _recipe(model: str, published: float) -> Recipe:
    return Recipe(**{k: getattr(RBNN_CIFAR10_RECIPE, k) for k in ("dataset", "input_shape", "epochs", "batch_size",
                                                                  "optimizer", "lr", "weight_decay", "schedule")},
                  source=f"{_SOURCE}; published {model}: {published} % top-1 (RBNN readme)",
                  extra={**RBNN_CIFAR10_RECIPE.extra, "published_top1": published})


def _rbnn_quantizers():
    return RBNNActivation(), RBNNWeight()


def materialize_rbnn(model: nn.Module) -> nn.Module:
    """Size every RBNN weight quantizer's ``alpha`` (init mean_o|W|), ``rotate`` (π/2), ``R1``, ``R2`` (random
    orthogonal) from its layer's weight now, as the reference constructor does, instead of at the first
    forward (so a checkpoint maps onto them strictly and the parameter count is the architecture's)."""
    for m in model.modules():
        q = getattr(m, "weight_quantizer", None)
        if isinstance(q, RBNNWeight) and isinstance(getattr(m, "weight", None), nn.Parameter):
            q._ensure(m.weight)
    return model


RBNN_MAPPING = ModelMapping(
    renames=((r"\.(alpha|rotate|R1|R2)$", r".weight_quantizer.\1"),),
    notes="<conv>.{alpha,rotate,R1,R2} -> <conv>.weight_quantizer.*; module. prefixes (DataParallel); "
          "wrapped {'epoch','model','state_dict','best_prec1','parameters'} dicts",
)


@register("rbnn_resnet20_1w1a", RBNN_CIFAR10_RECIPE)
def rbnn_resnet20_1w1a(num_classes: int = 10) -> nn.Module:
    return materialize_rbnn(CifarResNet((3, 3, 3), (16, 32, 64), _rbnn_quantizers, block="standard", shortcut="A",
                                        stem_act="hardtanh", init="kaiming_bn1e-8", num_classes=num_classes))


@register("rbnn_resnet20_bireal_1w1a", _recipe("resnet20_bireal_1w1a", 87.8))
def rbnn_resnet20_bireal_1w1a(num_classes: int = 10) -> nn.Module:
    return materialize_rbnn(CifarResNet((3, 3, 3), (16, 32, 64), _rbnn_quantizers, block="bireal", shortcut="A",
                                        stem_act="hardtanh", init="kaiming_bn1e-8", num_classes=num_classes))


@register("rbnn_resnet18_1w1a", _recipe("resnet18_1w1a", 92.2))
def rbnn_resnet18_1w1a(num_classes: int = 10) -> nn.Module:
    return materialize_rbnn(CifarResNet((2, 2, 2, 2), (64, 128, 256, 512), _rbnn_quantizers, block="standard",
                                        shortcut="binary", stem_act=None, init="default", num_classes=num_classes))


@register("rbnn_vgg_small_1w1a", _recipe("vgg_small_1w1a", 91.3))
def rbnn_vgg_small_1w1a(num_classes: int = 10) -> nn.Module:
    return materialize_rbnn(CifarVGGSmall(_rbnn_quantizers, num_classes=num_classes))


for _name in ("rbnn_resnet20_1w1a", "rbnn_resnet20_bireal_1w1a", "rbnn_resnet18_1w1a", "rbnn_vgg_small_1w1a"):
    register_mapping(_name, RBNN_MAPPING)
