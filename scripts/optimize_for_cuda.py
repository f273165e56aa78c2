#!/usr/bin/env python3
"""Fuses and converts an optimum ONNX export of Stable Diffusion 1.x/2.x to float16 for ONNX
Runtime's CUDA execution provider, the way ORT's own stable_diffusion optimize_pipeline does:
run onnxruntime.transformers' optimizer (unet: MultiHeadAttention with packed QKV/KV,
GroupNorm/SkipGroupNorm, NhwcConv, BiasSplitGelu, BiasAdd; clip: attention, SkipLayerNorm;
vae: GroupNorm, attention), then convert to float16 with float16 inputs and outputs.

The fused graphs use com.microsoft operators that only the CUDA provider implements: keep the
unfused export for CPU. Start from an fp32 export (optimizing an fp16 export trips two bugs in
onnxruntime's Python fusions, both worked around below anyway).

SDXL: text_encoder_2 is optimized like text_encoder; a VAE whose config.json says force_upcast
(SDXL's, which overflows in float16) is fused but kept float32.

LoRAs: a component with a name_map.json (scripts/name_map.py) keeps one. The packed QKV/KV
attention fusions, which concatenate the q/k/v weights into one interleaved initializer, are then
turned off so that each projection stays a weight a LoRA can patch (--no-lora keeps them and drops
the maps); after fusion and fp16 conversion every mapped weight is looked up again (by name, else
by value, e.g. an NHWC convolution weight) and the map rewritten; weights no longer found are left
out and counted (a LoRA targeting them is then refused by name, never silently ignored).

usage: python3 scripts/optimize_for_cuda.py IN_DIR OUT_DIR [--keep-fp32] [--no-lora]
           [--components unet,text_encoder,text_encoder_2,vae_decoder]
Needs: pip install onnxruntime (or onnxruntime-gpu) onnx numpy
"""
import argparse
import importlib
import os
import shutil
import sys
import time

import numpy as np
import onnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import name_map  # noqa: E402

MODEL_TYPES = {"unet": "unet", "text_encoder": "clip", "text_encoder_2": "clip", "vae_decoder": "vae", "vae_encoder": "vae"}
TWO_GB = 2 * 1024**3


def patch_fusions():
    """Work around two onnxruntime.transformers issues (seen with 1.30/1.31):

    1. GroupNorm fusion declares gamma/beta as FLOAT but passes the graph's arrays, which are
       float16 in an fp16 export: cast them to float32 when they are added.
    2. FusionAttentionUnet.get_num_heads calls int() on a 1-element 1-D array, a TypeError with
       NumPy 2: read the element instead.

    The package is importable under two names (it puts its folder on sys.path), so patch both.
    """
    for prefix in ("onnxruntime.transformers.", ""):
        try:
            base = importlib.import_module(prefix + "fusion_base")
            attn = importlib.import_module(prefix + "fusion_attention_unet")
        except ImportError:
            continue
        if not getattr(base.Fusion, "_corral_patched", False):
            original = base.Fusion.add_initializer

            def add_initializer(self, name, data_type, dims, vals, raw=True, _original=original):
                if data_type == onnx.TensorProto.FLOAT and isinstance(vals, np.ndarray):
                    vals = vals.astype(np.float32)
                return _original(self, name, data_type, dims, vals, raw)

            base.Fusion.add_initializer = add_initializer
            base.Fusion._corral_patched = True
        cls = attn.FusionAttentionUnet
        if not getattr(cls, "_corral_patched", False):
            original_heads = cls.get_num_heads

            def get_num_heads(self, reshape_q, is_torch2=False, _original=original_heads):
                try:
                    return _original(self, reshape_q, is_torch2)
                except TypeError:
                    node = self.model.get_parent(reshape_q, 1) if is_torch2 else None
                    src = node.input[2] if node is not None and len(node.input) == 4 else reshape_q.input[1]
                    v = self.model.get_constant_value(src)
                    if isinstance(v, np.ndarray) and v.size >= 1:
                        return int(v.reshape(-1)[2 if v.size == 4 else 0])
                    return 0

            cls.get_num_heads = get_num_heads
            cls._corral_patched = True


def optimize(component, src, dst, keep_fp32, lora):
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = MODEL_TYPES[component]
    t0 = time.time()
    opts = FusionOptions(model_type)
    map_src = os.path.join(os.path.dirname(src), name_map.NAME_MAP)
    keep_map = lora and os.path.exists(map_src)
    if keep_map and hasattr(opts, "enable_packed_qkv"):
        opts.enable_packed_qkv = False
        opts.enable_packed_kv = False
    m = optimize_model(src, model_type=model_type, num_heads=0, hidden_size=0, opt_level=0, optimization_options=opts, use_gpu=True)
    t1 = time.time()
    if not keep_fp32:
        fp32 = sum(1 for i in m.model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) >= 2)
        fp16 = sum(1 for i in m.model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16)
        if fp32 > fp16:
            # fp16 everywhere including inputs/outputs: Corral reads the IO types from the session.
            m.convert_float_to_float16(keep_io_types=False)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    big = m.model.ByteSize() > TWO_GB - 64 * 1024**2
    if keep_map:
        refreshed, dropped = name_map.refresh(name_map.load(map_src), onnx.load(src), m.model)
        name_map.save(refreshed, os.path.join(os.path.dirname(dst), name_map.NAME_MAP))
        print(f"{component}: name map kept {len(refreshed['weights'])} weights, dropped {len(dropped)} {dropped[:5]}", flush=True)
    m.save_model_to_file(dst, use_external_data_format=big)
    print(f"{component}: fused {m.get_fused_operator_statistics()} in {t1 - t0:.1f}s, wrote {dst} ({time.time() - t0:.1f}s total)", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--keep-fp32", action="store_true", help="fuse only, keep float32")
    ap.add_argument("--no-lora", action="store_true", help="pack q/k/v weights (faster) and drop the LoRA name maps")
    ap.add_argument("--components", default=None, help="default: those of the export among " + ",".join(MODEL_TYPES))
    a = ap.parse_args()
    patch_fusions()
    if a.components is None:
        wanted = [c for c in MODEL_TYPES if os.path.exists(os.path.join(a.input, c, "model.onnx"))]
    else:
        wanted = [c for c in a.components.split(",") if c]
    for c in wanted:
        if c not in MODEL_TYPES:
            sys.exit(f"unknown component {c}; expected some of {', '.join(MODEL_TYPES)}")
    # Everything that is not a graph we rewrite is copied as is (tokenizer, scheduler, configs).
    for root, _, files in os.walk(a.input):
        rel = os.path.relpath(root, a.input)
        for f in files:
            if rel in wanted and (f.endswith(".onnx") or f.endswith(".onnx_data") or f == name_map.NAME_MAP):
                continue
            os.makedirs(os.path.join(a.output, rel), exist_ok=True)
            shutil.copy2(os.path.join(root, f), os.path.join(a.output, rel, f))
    for c in wanted:
        src = os.path.join(a.input, c, "model.onnx")
        if not os.path.exists(src):
            sys.exit(f"missing {src}")
        keep_fp32 = a.keep_fp32
        cfg_path = os.path.join(a.input, c, "config.json")
        if c.startswith("vae") and os.path.exists(cfg_path):
            import json

            # SDXL's VAE overflows in float16 (its config says force_upcast): keep it float32.
            keep_fp32 = keep_fp32 or bool(json.load(open(cfg_path)).get("force_upcast"))
        optimize(c, src, os.path.join(a.output, c, "model.onnx"), keep_fp32, not a.no_lora)


if __name__ == "__main__":
    main()
