#!/usr/bin/env python3
"""How much ONNX Runtime charges for each way of swapping weights, on a graph big enough to show
it (the tiny fixtures are too small): N MatMul layers of H x H float32 weights (default 40 x 1024,
168 MB), half of them patched, as a LoRA set would. Side by side, in one run:

  create            a session from the file (what a full reload of the component costs)
  create+override   a new session with the patched weights as add_initializer overrides
                    (SessionBuilder::with_initializer in ort), the session-rebuild way to switch
  feed              the patched weights fed as inputs of the running session (the weights are
                    graph inputs with initializer defaults): Corral's way; the switch itself
                    costs nothing in ONNX Runtime, only the merge
  run const / run fed   one inference with constant weights vs with fed ones (the price of
                    weights that are inputs: no pre-packing)
  conv const / conv fed the same for 3x3 convolutions (NCHWc pre-packing lost)

usage: python3 scripts/measure_lora_switch.py [N H ROWS]  needs: pip install onnx onnxruntime numpy
(ROWS: activations per MatMul, default 256; a 64x64-latent UNet batch of 2 has 8192 tokens)
"""
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def matmul_model(n, h, overridable):
    rng = np.random.default_rng(0)
    inits, nodes, x = [], [], "x"
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", h])]
    for i in range(n):
        w = (rng.standard_normal((h, h)) / np.sqrt(h)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"onnx::MatMul_{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"onnx::MatMul_{i}"], [f"h{i}"]))
        nodes.append(helper.make_node("Tanh", [f"h{i}"], [f"t{i}"]))
        x = f"t{i}"
        if overridable:
            inputs.append(helper.make_tensor_value_info(f"onnx::MatMul_{i}", TensorProto.FLOAT, [h, h]))
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["b", h])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def conv_model(overridable):
    rng = np.random.default_rng(0)
    inits, nodes, x = [], [], "x"
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 128, 64, 64])]
    for i in range(10):
        w = (rng.standard_normal((128, 128, 3, 3)) / np.sqrt(128 * 9)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"c{i}.weight"))
        nodes.append(helper.make_node("Conv", [x, f"c{i}.weight"], [f"h{i}"], pads=[1, 1, 1, 1]))
        x = f"h{i}"
        if overridable:
            inputs.append(helper.make_tensor_value_info(f"c{i}.weight", TensorProto.FLOAT, [128, 128, 3, 3]))
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def opts():
    o = ort.SessionOptions()
    o.intra_op_num_threads = 2
    o.log_severity_level = 3
    return o


def best(f, n=3):
    t = 1e9
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        t = min(t, time.perf_counter() - t0)
    return t


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    h = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
    rows = int(sys.argv[3]) if len(sys.argv) > 3 else 256
    base, ovr = matmul_model(n, h, False), matmul_model(n, h, True)
    cpu = ["CPUExecutionProvider"]
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load_from_string(base).graph.initializer}
    patched = {k: v * np.float32(1.01) for k, v in list(weights.items())[: n // 2]}
    x = np.random.default_rng(1).standard_normal((rows, h)).astype(np.float32)
    print(f"onnxruntime {ort.__version__}, {n} MatMuls of {rows}x{h} by {h}x{h} ({len(base) / 1e6:.0f} MB), {len(patched)} patched")
    print(f"create            {best(lambda: ort.InferenceSession(base, opts(), providers=cpu)):.3f} s")
    print(f"create overridable {best(lambda: ort.InferenceSession(ovr, opts(), providers=cpu)):.3f} s")

    def rebuild():
        o = opts()
        keep = [ort.OrtValue.ortvalue_from_numpy(v) for v in patched.values()]
        for k, v in zip(patched, keep):
            o.add_initializer(k, v)
        return ort.InferenceSession(base, o, providers=cpu), keep

    print(f"create+override   {best(rebuild):.3f} s")
    s_base = ort.InferenceSession(base, opts(), providers=cpu)
    s_ovr = ort.InferenceSession(ovr, opts(), providers=cpu)
    fed = dict(x=x, **patched)
    print(f"feed              0 s (binding inputs)")
    print(f"run const         {best(lambda: s_base.run(None, {'x': x}), 5):.3f} s")
    print(f"run unfed         {best(lambda: s_ovr.run(None, {'x': x}), 5):.3f} s  (weights are inputs, defaults used)")
    print(f"run fed           {best(lambda: s_ovr.run(None, fed), 5):.3f} s")
    xc = np.random.default_rng(1).standard_normal((2, 128, 64, 64)).astype(np.float32)
    c_base = ort.InferenceSession(conv_model(False), opts(), providers=cpu)
    c_ovr = ort.InferenceSession(conv_model(True), opts(), providers=cpu)
    print(f"conv const        {best(lambda: c_base.run(None, {'x': xc}), 5):.3f} s")
    print(f"conv fed          {best(lambda: c_ovr.run(None, {'x': xc}), 5):.3f} s")


if __name__ == "__main__":
    main()
