#!/usr/bin/env python3
"""Builds a real-size Stable Diffusion export with random weights, offline, in the layout Corral
loads (optimum's: model_index.json, text_encoder/, [text_encoder_2/], unet/, vae_decoder/,
vae_encoder/, tokenizer/, [tokenizer_2/], scheduler/), plus the LoRA name maps
(<component>/name_map.json, see scripts/name_map.py).

The architectures are SD 1.5's or SDXL 1.0's public configurations (written out below, so no hub
access is needed): diffusers' UNet2DConditionModel and AutoencoderKL, transformers' CLIPTextModel
and CLIPTextModelWithProjection, seeded random weights, exported with torch.onnx (TorchScript
exporter, opset 17) under optimum's input and output names. The tokenizer is the tiny BPE of
make_tiny_sd.py (the real CLIP vocabulary is not on PyPI): its ids are valid for the 49408-entry
embedding, and random weights make any prompt as good as another. Use it for load-time, memory
and step-time figures (`corral bench-pipeline`, examples/bench_pipeline.rs), not for pictures.

usage: python3 scripts/make_real_sd.py {sd15,sdxl} OUT_DIR [--fp16] [--seed N]
needs: pip install torch diffusers transformers onnx numpy   (about 6 GB; not part of CI)
sizes: sd15 4.1 GB fp32 (UNet 3.4 GB as model.onnx + model.onnx_data), sdxl about 14 GB fp32.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import onnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_tiny_sd  # noqa: E402  (the tokenizer writer)
import name_map  # noqa: E402

OPSET = 17
TWO_GB = 2 * 1024**3

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048,
    "attention_head_dim": [5, 10, 20],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
}


def export(module, args, names_in, names_out, dynamic, path):
    """torch.onnx.export (TorchScript) into a scratch folder, then one model.onnx with, past
    2 GB, one model.onnx_data beside it."""
    import torch

    os.makedirs(os.path.dirname(path), exist_ok=True)
    scratch = tempfile.mkdtemp(dir=os.path.dirname(path))
    tmp = os.path.join(scratch, "model.onnx")
    kwargs = dict(input_names=names_in, output_names=names_out, dynamic_axes=dynamic, opset_version=OPSET, do_constant_folding=True)
    if "dynamo" in torch.onnx.export.__code__.co_varnames:
        kwargs["dynamo"] = False
    with torch.no_grad():
        torch.onnx.export(module, args, tmp, **kwargs)
    model = onnx.load(tmp)
    # Past 2 GB torch writes the tensors as separate files beside the graph.
    big = os.path.getsize(tmp) > TWO_GB - 64 * 1024**2 or any(f != "model.onnx" for f in os.listdir(scratch))
    if big:
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx_data", size_threshold=1024)
    else:
        onnx.save_model(model, path)
    shutil.rmtree(scratch)
    print("wrote", path, flush=True)
    return onnx.load(path)


def state_dict(module):
    return {k: v.detach().float().cpu().numpy() if v.dtype.is_floating_point else v.cpu().numpy() for k, v in module.state_dict().items()}


def write_map(model, module, component, path, fp16):
    sd = state_dict(module)
    if fp16:
        sd = {k: v.astype(np.float16) for k, v in sd.items()}
    m, unmatched = name_map.build(model, sd, component)
    name_map.save(m, os.path.join(os.path.dirname(path), name_map.NAME_MAP))
    print(f"{component}: name map of {len(m['weights'])} parameters ({len(unmatched)} not found, e.g. buffers)", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("arch", choices=["sd15", "sdxl"])
    ap.add_argument("out")
    ap.add_argument("--fp16", action="store_true", help="float16 weights and IO (CUDA); the SDXL VAE stays float32 (it overflows in fp16)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(a.seed)
    xl = a.arch == "sdxl"
    dtype = torch.float16 if a.fp16 else torch.float32
    out = a.out
    os.makedirs(out, exist_ok=True)

    # Tokenizers.
    make_tiny_sd.make_tokenizer(os.path.join(out, "tokenizer"), "<|endoftext|>")
    if xl:
        make_tiny_sd.make_tokenizer(os.path.join(out, "tokenizer_2"), "!")
    ids = torch.zeros((1, 77), dtype=torch.int32)

    class TextEncoder(torch.nn.Module):
        def __init__(self, m, projection, hidden):
            super().__init__()
            self.m, self.projection, self.hidden = m, projection, hidden

        def forward(self, input_ids):
            o = self.m(input_ids=input_ids.long(), output_hidden_states=self.hidden)
            res = [o.text_embeds, o.last_hidden_state] if self.projection else [o.last_hidden_state, o.pooler_output]
            if self.hidden:
                res += list(o.hidden_states)
            return tuple(res)

    encoders = [("text_encoder", CLIP_L, False)] + ([("text_encoder_2", CLIP_BIGG, True)] if xl else [])
    for name, conf, projection in encoders:
        cls = CLIPTextModelWithProjection if projection else CLIPTextModel
        m = cls(CLIPTextConfig(**conf)).eval().to(dtype)
        layers = conf["num_hidden_layers"]
        outs = (["text_embeds", "last_hidden_state"] if projection else ["last_hidden_state", "pooler_output"])
        if xl:
            outs += [f"hidden_states.{i}" for i in range(layers + 1)]
        dyn = {"input_ids": {0: "batch_size"}, **{o: {0: "batch_size"} for o in outs}}
        path = os.path.join(out, name, "model.onnx")
        model = export(TextEncoder(m, projection, xl), (ids,), ["input_ids"], outs, dyn, path)
        write_map(model, m, name, path, a.fp16)
        del m, model

    # UNet.
    uconf = SDXL_UNET if xl else SD15_UNET
    unet = UNet2DConditionModel(**uconf).eval().to(dtype)

    class Unet(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
            added = {"text_embeds": text_embeds, "time_ids": time_ids} if text_embeds is not None else None
            return self.m(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]

    lat = uconf["sample_size"]
    args = [torch.zeros((2, 4, lat, lat), dtype=dtype), torch.tensor([999, 999], dtype=torch.int64), torch.zeros((2, 77, uconf["cross_attention_dim"]), dtype=dtype)]
    names = ["sample", "timestep", "encoder_hidden_states"]
    dyn = {"sample": {0: "batch_size", 2: "height", 3: "width"}, "timestep": {0: "steps"}, "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"}, "out_sample": {0: "batch_size", 2: "height", 3: "width"}}
    if xl:
        args += [torch.zeros((2, 1280), dtype=dtype), torch.zeros((2, 6), dtype=dtype)]
        names += ["text_embeds", "time_ids"]
        dyn.update({"text_embeds": {0: "batch_size"}, "time_ids": {0: "batch_size"}})
    path = os.path.join(out, "unet", "model.onnx")
    model = export(Unet(unet), tuple(args), names, ["out_sample"], dyn, path)
    write_map(model, unet, "unet", path, a.fp16)
    with open(os.path.join(out, "unet", "config.json"), "w") as f:
        json.dump(dict(uconf, _class_name="UNet2DConditionModel"), f, indent=2)
    del unet, model

    # VAE (float32 for SDXL: its decoder overflows in float16).
    vae_dtype = torch.float32 if xl else dtype
    scaling = 0.13025 if xl else 0.18215
    vconf = dict(VAE, sample_size=1024 if xl else 512, scaling_factor=scaling, force_upcast=xl)
    vae = AutoencoderKL(**vconf).eval().to(vae_dtype)

    class Decoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, latent_sample):
            return self.m.decode(latent_sample, return_dict=False)[0]

    class Encoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, sample):
            return self.m.encode(sample).latent_dist.parameters

    export(Decoder(vae), (torch.zeros((1, 4, lat, lat), dtype=vae_dtype),), ["latent_sample"], ["sample"], {"latent_sample": {0: "batch_size", 2: "latent_height", 3: "latent_width"}, "sample": {0: "batch_size", 2: "height", 3: "width"}}, os.path.join(out, "vae_decoder", "model.onnx"))
    export(Encoder(vae), (torch.zeros((1, 3, lat * 8, lat * 8), dtype=vae_dtype),), ["sample"], ["latent_parameters"], {"sample": {0: "batch_size", 2: "sample_height", 3: "sample_width"}, "latent_parameters": {0: "batch_size", 2: "latent_height", 3: "latent_width"}}, os.path.join(out, "vae_encoder", "model.onnx"))
    for part in ("vae_decoder", "vae_encoder"):
        with open(os.path.join(out, part, "config.json"), "w") as f:
            json.dump(dict(vconf, _class_name="AutoencoderKL"), f, indent=2)

    sched = dict(SCHEDULER, _class_name="EulerDiscreteScheduler" if xl else "PNDMScheduler")
    if xl:
        sched.update({"timestep_spacing": "leading", "interpolation_type": "linear"})
    else:
        sched.update({"skip_prk_steps": True})
    os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
    with open(os.path.join(out, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(sched, f, indent=2)
    index = {
        "_class_name": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
        "scheduler": ["diffusers", sched["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae_decoder": ["diffusers", "AutoencoderKL"],
        "vae_encoder": ["diffusers", "AutoencoderKL"],
    }
    if xl:
        index.update({"force_zeros_for_empty_prompt": True, "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer_2": ["transformers", "CLIPTokenizer"]})
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    print("done:", out)


if __name__ == "__main__":
    main()
