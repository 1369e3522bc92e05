"""bnnc: binary neural networks from PyTorch training to bit-packed kernels.

    import bnnc
    net = bnnc.models.create("fmnist_bnn")
    bnnc.train(net, "fashion-mnist", epochs=3, out="runs/fm")
    bnnc.export(net, "model.onnx", input_shape=(1, 1, 28, 28))
    cm = bnnc.compile("model.onnx", target="cpu", runtime="tvm")
    cm.save("model.bnnc"); cm = bnnc.load("model.bnnc")
    bnnc.evaluate(cm, "fashion-mnist", split="test")
"""

__version__ = "0.1.0"

from . import nn  # noqa: E402
from . import models  # noqa: E402
from .checkpoints import import_checkpoint  # noqa: E402
from .compile import CompiledModel, compile, load  # noqa: E402
from .errors import BnncError  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .export import export  # noqa: E402
from .train import load_checkpoint, train  # noqa: E402


def fold(model, output=None):
    """Run the deploy passes: export-form ONNX (path or ModelProto) → deploy-form ``ModelProto``
    (written atomically to ``output`` when given)."""
    from .compile import read_onnx
    from .export import save_onnx
    from .passes.pipeline import to_deploy

    proto, _ = read_onnx(model)
    deploy = to_deploy(proto)
    if output is not None:
        save_onnx(deploy, output)
    return deploy


__all__ = ["models", "nn", "train", "export", "fold", "compile", "load", "evaluate", "load_checkpoint",
           "import_checkpoint",
           "CompiledModel", "BnncError", "__version__"]
