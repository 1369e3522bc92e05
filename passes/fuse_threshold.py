"""Fuse ``BinaryConv2dPacked(float) → elementwise region [→ MaxPool → region]* → PackSign`` into a conv
with packed output: the next binary decision becomes the integer test ``dir·D ≥ thr`` (deploy.md §5), and
each max pool becomes a bitwise OR — or AND where the decision falls as the pooled value rises, e.g. a
negative BatchNorm scale after the pool (§6).

The decision for every reachable D is computed by running the export form's own nodes (BatchNorm,
PReLU, Maxout, Clip, …) on ONNX Runtime, so the integer test agrees with the reference exactly.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bnnc.ops import DOMAIN

from . import arith
from ._graph import add_initializer, attr, const, is_bnnc, replace_value, warn_fallback
from .decision import evaluate_region, find_region, monotone_direction
from .lower_binary_conv import AFFINE_KEY, SA_SOURCE_SUFFIX


def _pool_mode(z: np.ndarray, decide: np.ndarray) -> str | None:
    """'or' / 'and' if every channel's decision is monotone (same way) in the pooled value."""
    dirs = set()
    for c in range(decide.shape[0]):
        d = monotone_direction(z[0, c, :, 0], decide[c])
        if d is None:
            return None
        if d:
            dirs.add(d)
    if dirs == {-1}:
        return "and"
    return "or" if dirs <= {1} else None


class FuseThresholdPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for conv in list(graph):
            if not (is_bnnc(conv, "BinaryConv2dPacked") and attr(conv, "output") == "float"):
                continue
            if attr(conv, "source", "").endswith(SA_SOURCE_SUFFIX):
                continue  # the window sum S_a of an affine conv, not a layer output
            p0, p1 = const(conv.inputs[5]), const(conv.inputs[6])
            affine = conv.metadata_props.get(AFFINE_KEY) == "1"
            if p0 is None or p1 is None or (np.any(p1 != 0) and not affine):
                continue  # an epilogue already folded: the export form's float32 semantics are not at hand
            cout = attr(conv, "out_channels")
            region = find_region(conv.outputs[0], cout)
            if region is None:
                continue
            pack = region.pack
            theta = const(pack.inputs[1]) if len(pack.inputs) > 1 and pack.inputs[1] is not None else np.zeros(cout)
            if theta is None:
                continue
            theta = np.broadcast_to(np.asarray(theta, np.float32).reshape(-1), (cout,))
            kh, kw = attr(conv, "kernel_shape")
            k_max = attr(conv, "in_channels") * kh * kw
            # plain convs: the export form's fl32(D·r); affine ones (lowered with their constant term in
            # P1, no S_a term): the deploy epilogue fl32(fl32(D·P0) + P1) itself, equal to the export form
            # up to float32 rounding (deploy.md §5)
            zs = evaluate_region(model, region, arith.popcount_grid(p0, k_max, p1 if affine else None))
            decide = zs[-1][0, :, :, 0] >= theta[:, None]
            try:
                direction, thr = arith.threshold_from_decisions(decide, k_max)
            except ValueError as e:
                warn_fallback(conv, f"output binarized through a non-monotone function ({e})")
                continue
            modes = [_pool_mode(zs[k], decide) for k in range(len(region.pools))]
            if None in modes:
                warn_fallback(conv, "a max pool whose binary decision is neither OR nor AND per channel")
                continue
            name = conv.name
            bits = ir.Value(name=f"{conv.outputs[0].name}_bits")
            bits.dtype = ir.DataType.UINT32
            new_nodes = [ir.Node(DOMAIN, "BinaryConv2dPacked", list(conv.inputs[:5]) + [
                add_initializer(graph, f"{name}.direction", direction),
                add_initializer(graph, f"{name}.threshold", thr),
            ], attributes={**conv.attributes, "output": ir.AttrString("output", "bits")}, outputs=[bits], name=name)]
            new_nodes[0].metadata_props.update(conv.metadata_props)
            out = bits
            for pool, mode in zip(region.pools, modes):
                pooled = ir.Value(name=f"{pool.outputs[0].name}_bits")
                pooled.dtype = ir.DataType.UINT32
                new_nodes.append(ir.Node(DOMAIN, "MaxPoolBits", [out], attributes=[
                    ir.AttrInt64("channels", cout),
                    ir.AttrInt64s("kernel_shape", list(attr(pool, "kernel_shape"))),
                    ir.AttrInt64s("strides", list(attr(pool, "strides", (1, 1)))),
                    ir.AttrInt64s("pads", list(attr(pool, "pads", (0, 0, 0, 0)))),
                    ir.AttrString("mode", mode),
                ], outputs=[pooled], name=pool.name))
                out = pooled
            graph.insert_after(pack, new_nodes)
            replace_value(pack.outputs[0], out)
            graph.remove([pack] + region.nodes[::-1] + [conv], safe=True)
            modified = True
        if modified:
            graph.sort()
        return ir.passes.PassResult(model, modified)
