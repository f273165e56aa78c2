#!/usr/bin/env python3
"""Name maps: which ONNX initializer holds each PyTorch parameter of an exported component.

torch.onnx renames the weights it transposes for MatMul (``onnx::MatMul_1234`` holds
``to_q.weight`` transposed), and graph optimizers may rename or re-layout others, so a LoRA
(whose keys name PyTorch modules) cannot be applied to an export by name alone. Corral's
pipeline reads ``<component>/name_map.json`` beside each ``model.onnx``:

    {"format": "corral-name-map/1", "component": "unet",
     "weights": {"mid_block.attentions.0.transformer_blocks.0.attn2.to_q.weight":
                     {"onnx": "onnx::MatMul_2302", "perm": [1, 0]},
                 "conv_in.weight": {"onnx": "conv_in.weight"}}}

``perm`` is the axis permutation that turns the PyTorch tensor into the ONNX one (numpy's
``transpose(perm)``); absent means identical layout. Maps are built by VALUE: every PyTorch
tensor (in the initializer's dtype, under the identity, 2-D transpose and NCHW->NHWC
permutations) is hashed and looked up among the initializers, so they work for any exporter.
Values shared by several initializers (zeros, ones) are left out as ambiguous.

Library use (make_tiny_sd.py, make_real_sd.py, optimize_for_cuda.py) and a command line for
an existing optimum export, given the diffusers checkpoint it came from (needs `safetensors`):

    python3 scripts/name_map.py EXPORT_DIR DIFFUSERS_DIR
"""
import hashlib
import json
import os
import sys

import numpy as np

FORMAT = "corral-name-map/1"
NAME_MAP = "name_map.json"
# Components a LoRA may target, and where diffusers keeps their PyTorch weights.
COMPONENTS = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
    "text_encoder_2": "text_encoder_2/model.safetensors",
}


def _perms(ndim):
    out = [None]
    if ndim == 2:
        out.append([1, 0])
    if ndim == 4:
        out.append([0, 2, 3, 1])
    return out


def _key(arr):
    arr = np.ascontiguousarray(arr)
    return (arr.shape, arr.dtype.str, hashlib.sha1(arr.tobytes()).hexdigest())


def _initializers(model):
    """{name: numpy array} of an onnx.ModelProto's float initializers (external data loaded)."""
    from onnx import numpy_helper

    out = {}
    for t in model.graph.initializer:
        arr = numpy_helper.to_array(t)
        if arr.dtype in (np.float32, np.float16):
            out[t.name] = arr
    return out


def build(model, state_dict, component):
    """Maps each PyTorch parameter (numpy arrays in `state_dict`) to the initializer of `model`
    (an onnx.ModelProto) holding it. Returns (map, unmatched parameter names)."""
    inits = _initializers(model)
    by_value = {}
    for name, arr in inits.items():
        by_value.setdefault(_key(arr), []).append(name)
    weights, unmatched = {}, []
    dtypes = {a.dtype for a in inits.values()}
    for pname, p in state_dict.items():
        p = np.asarray(p)
        found = None
        for perm in _perms(p.ndim):
            q = p if perm is None else p.transpose(perm)
            for dt in dtypes:
                names = by_value.get(_key(q.astype(dt)), [])
                if len(names) == 1:
                    found = (names[0], perm)
                    break
            if found:
                break
        if found is None:
            unmatched.append(pname)
            continue
        entry = {"onnx": found[0]}
        if found[1] is not None:
            entry["perm"] = found[1]
        weights[pname] = entry
    return {"format": FORMAT, "component": component, "weights": dict(sorted(weights.items()))}, unmatched


def refresh(name_map, old_model, new_model):
    """After a graph rewrite (fusion, fp16 conversion): keeps entries whose initializer is still
    there with the same dims, finds moved ones by value (in the new dtype, under the same
    permutations), and drops the rest. Returns (new map, dropped parameter names)."""
    old = _initializers(old_model)
    new = _initializers(new_model)
    by_value = {}
    for name, arr in new.items():
        by_value.setdefault(_key(arr), []).append(name)
    weights, dropped = {}, []
    for pname, entry in name_map["weights"].items():
        src = old.get(entry["onnx"])
        cur = new.get(entry["onnx"])
        if src is not None and cur is not None and cur.shape == src.shape:
            weights[pname] = entry
            continue
        found = None
        if src is not None:
            perm0 = entry.get("perm")
            torch_value = src if perm0 is None else src.transpose(np.argsort(perm0))
            for perm in _perms(torch_value.ndim):
                q = torch_value if perm is None else torch_value.transpose(perm)
                for dt in {a.dtype for a in new.values()}:
                    names = by_value.get(_key(q.astype(dt)), [])
                    if len(names) == 1:
                        found = {"onnx": names[0]}
                        if perm is not None:
                            found["perm"] = perm
                        break
                if found:
                    break
        if found:
            weights[pname] = found
        else:
            dropped.append(pname)
    return dict(name_map, weights=weights), dropped


def save(name_map, path):
    with open(path, "w") as f:
        json.dump(name_map, f, indent=1, sort_keys=True)
        f.write("\n")


def load(path):
    with open(path) as f:
        m = json.load(f)
    if m.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file")
    return m


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    import onnx
    from safetensors.numpy import load_file

    export, checkpoint = sys.argv[1], sys.argv[2]
    for component, rel in COMPONENTS.items():
        onnx_path = os.path.join(export, component, "model.onnx")
        weights_path = os.path.join(checkpoint, rel)
        if not os.path.exists(onnx_path) or not os.path.exists(weights_path):
            continue
        model = onnx.load(onnx_path)
        m, unmatched = build(model, load_file(weights_path), component)
        save(m, os.path.join(export, component, "name_map.json"))
        print(f"{component}: {len(m['weights'])} parameters mapped, {len(unmatched)} not found", flush=True)


if __name__ == "__main__":
    main()
