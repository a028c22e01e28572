"""Export a Keras ``Sequential`` image classifier to ONNX, offline, with the ``onnx`` package
only (``python -m workers.onnx_export MODEL.keras OUT.onnx``; ``make`` builds the demo ONNX
model this way).

tf2onnx, the usual converter, pins a protobuf that TensorFlow 2.16+ no longer accepts, so this
module writes the graph itself, layer by layer, for the layers the demo models use:
Rescaling, Conv2D (stride 1, ``same`` or ``valid``), BatchNormalization, Activation,
MaxPooling2D, GlobalAverage/MaxPooling2D, Flatten, Dropout and Dense. Any other layer is refused
by name. The ONNX model takes the Keras model's input unchanged (``[batch, height, width, 3]``,
float, 0-255 when the model scales inside) and gives its output (``[batch, classes]``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: ONNX Runtime 1.17+ runs this opset and IR version.
OPSET = 17
IR_VERSION = 8


class _Graph:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.weights: list[onnx.TensorProto] = []
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, hint: str, value: Any) -> str:
        name = self.name(hint)
        self.weights.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def op(self, kind: str, inputs: list[str], hint: str, **attrs: Any) -> str:
        out = self.name(hint)
        self.nodes.append(helper.make_node(kind, inputs, [out], name=out, **attrs))
        return out

    def activation(self, x: str, name: str, hint: str) -> str:
        if name in ("linear", None):
            return x
        if name == "relu":
            return self.op("Relu", [x], hint)
        if name == "softmax":
            return self.op("Softmax", [x], hint, axis=-1)
        if name == "sigmoid":
            return self.op("Sigmoid", [x], hint)
        raise NotImplementedError(f"activation {name!r} (layer {hint})")


#: Layers whose ONNX operators take NCHW (Keras' tensors are NHWC).
_CHANNELS_FIRST = (
    "Conv2D",
    "MaxPooling2D",
    "BatchNormalization",
    "GlobalAveragePooling2D",
    "GlobalMaxPooling2D",
)


def export(model: Any, out: Path) -> None:
    """Write ``model`` (a loaded Keras ``Sequential``) to ``out`` as ONNX."""
    g = _Graph()
    _, h, w, c = model.inputs[0].shape
    x, nchw = "images", False
    spatial = True  # the tensor still has its height and width (Flatten and global pools end that)
    for layer in model.layers:
        kind, cfg, hint = type(layer).__name__, layer.get_config(), layer.name
        weights = [np.asarray(v) for v in layer.get_weights()]
        if kind == "Rescaling":
            x = g.op("Mul", [x, g.const("scale", np.float32(cfg["scale"]))], hint)
            x = g.op("Add", [x, g.const("offset", np.float32(cfg["offset"]))], hint)
        elif kind in _CHANNELS_FIRST and not nchw and spatial:
            x, nchw = g.op("Transpose", [x], "to_nchw", perm=[0, 3, 1, 2]), True
        if kind == "Rescaling":
            continue
        if kind == "Conv2D":
            if tuple(cfg["strides"]) != (1, 1) or tuple(cfg["dilation_rate"]) != (1, 1) or cfg["groups"] != 1:
                raise NotImplementedError(f"{hint}: only stride 1, dilation 1, one group")
            kernel = weights[0].transpose(3, 2, 0, 1)  # (kh, kw, in, out) -> (out, in, kh, kw)
            kh, kw = kernel.shape[2:]
            # "same": as TensorFlow pads, the odd row or column of an even kernel at the end.
            pads = [(kh - 1) // 2, (kw - 1) // 2, kh // 2, kw // 2] if cfg["padding"] == "same" else [0] * 4
            inputs = [x, g.const("kernel", kernel)] + (
                [g.const("bias", weights[1])] if cfg["use_bias"] else []
            )
            x = g.op("Conv", inputs, hint, kernel_shape=[kh, kw], pads=pads)
            x = g.activation(x, cfg["activation"], hint)
        elif kind == "BatchNormalization":
            n = weights[-1].shape[0]
            it = iter(weights)
            gamma = next(it) if cfg["scale"] else np.ones(n)
            beta = next(it) if cfg["center"] else np.zeros(n)
            mean, var = next(it), next(it)
            params = [
                g.const(p, v) for p, v in (("gamma", gamma), ("beta", beta), ("mean", mean), ("var", var))
            ]
            x = g.op("BatchNormalization", [x, *params], hint, epsilon=float(cfg["epsilon"]))
        elif kind == "Activation":
            x = g.activation(x, cfg["activation"], hint)
        elif kind == "MaxPooling2D":
            if cfg["padding"] != "valid":
                raise NotImplementedError(f"{hint}: only valid padding")
            x = g.op("MaxPool", [x], hint, kernel_shape=list(cfg["pool_size"]), strides=list(cfg["strides"]))
        elif kind in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
            pooled = g.op("GlobalAveragePool" if "Average" in kind else "GlobalMaxPool", [x], hint)
            x, nchw, spatial = g.op("Flatten", [pooled], hint, axis=1), False, False
        elif kind == "Flatten":
            if nchw:  # Keras flattens NHWC
                x, nchw = g.op("Transpose", [x], "to_nhwc", perm=[0, 2, 3, 1]), False
            x, spatial = g.op("Flatten", [x], hint, axis=1), False
        elif kind == "Dropout":
            continue
        elif kind == "Dense":
            if nchw:  # Keras' Dense works on the last axis, the channels of NHWC
                x, nchw = g.op("Transpose", [x], "to_nhwc", perm=[0, 2, 3, 1]), False
            x = g.op("MatMul", [x, g.const("kernel", weights[0])], hint)
            if cfg["use_bias"]:
                x = g.op("Add", [x, g.const("bias", weights[1])], hint)
            x = g.activation(x, cfg["activation"], hint)
        else:
            raise NotImplementedError(f"layer {hint} ({kind}) has no ONNX export here")
    classes = int(model.outputs[0].shape[-1])
    g.nodes[-1].output[0] = "scores"  # the last node writes the graph's output
    graph = helper.make_graph(
        g.nodes,
        model.name or "model",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", h, w, c])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", classes])],
        [*g.weights],
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx_model.ir_version = IR_VERSION
    onnx.checker.check_model(onnx_model, full_check=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".onnx.tmp")
    onnx.save(onnx_model, tmp)
    tmp.replace(out)  # a worker watching the folder never sees half a file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.onnx_export", description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, help="a .keras file (its labels beside it are copied too)")
    parser.add_argument("out", type=Path, help="the .onnx file to write")
    args = parser.parse_args(argv)
    import keras

    export(keras.models.load_model(args.model, compile=False), args.out)
    labels = args.model.with_name(args.model.stem + ".labels.txt")
    if not labels.exists():
        labels = args.model.with_name("labels.txt")
    if labels.exists():
        shutil.copyfile(labels, args.out.with_name("labels.txt"))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
