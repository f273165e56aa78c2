#!/usr/bin/env python3
"""Writes a tiny, seeded Stable-Diffusion-shaped pipeline in the Hugging Face optimum ONNX layout.

Uses only onnx (onnx.helper) and numpy, so it runs anywhere the tests do. Two variants:

- fixtures/tiny-sd/       fp32, SD 1.x style: int64 timestep [batch], PNDMScheduler config,
                          pad token <|endoftext|>.
- fixtures/tiny-sd-fp16/  fp16 weights and fp16 IO (as optimum's --fp16 export), float16 timestep
                          [batch], EulerDiscreteScheduler config with v_prediction and trailing spacing,
                          SD 2.x style pad token "!". The graph casts to fp32 inside so that ONNX
                          Runtime's CPU provider (which lacks most fp16 kernels on x86) can run it.

Initializers are named as torch.onnx names them: parameters keep their PyTorch names (conv_in.weight),
except the weights of MatMuls, which the exporter stores transposed as onnx::MatMul_<n>. Each
text_encoder/ and unet/ gets the name_map.json (scripts/name_map.py) that maps them back, built by
value from the PyTorch-layout tensors. fixtures/loras/ gets tiny LoRAs for these weights: the same
LoRA in kohya and PEFT form, and a second one (fp16 tensors, a conv LoRA, the time embedding).

The networks are random but shaped like the real ones (text_encoder: input_ids int32 [batch, 77]
-> last_hidden_state [batch, 77, D] and pooler_output; unet: sample, timestep, encoder_hidden_states
-> out_sample with dynamic height/width and a cross-attention so that the prompt matters;
vae_decoder: latent_sample [b, 4, h, w] -> sample [b, 3, 8h, 8w]).

Usage: python3 scripts/make_tiny_sd.py [OUT_ROOT]   (default: fixtures)
"""
import json
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import name_map  # noqa: E402

D = 32  # text hidden size
C = 16  # unet channels
SEQ = 77
OPSET = 17

WORDS = (
    "a photo of an astronaut riding a horse on mars cat dog red blue green painting portrait "
    "landscape mountain river sunset city night ugly blurry low quality bad anatomy high detailed "
    "beautiful oil watercolor castle forest tree sky cloud ocean beach flower garden robot dragon "
    "the and with in by at"
).split()


def bytes_to_unicode():
    """CLIP/GPT-2's reversible byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def make_tokenizer(out_dir, pad_token):
    os.makedirs(out_dir, exist_ok=True)
    b2u = bytes_to_unicode()
    vocab = list(b2u.values())
    vocab += [v + "</w>" for v in vocab]
    merges = []
    seen = set()
    for w in WORDS:
        # Merge left to right: c a -> ca, ca t</w> -> cat</w>.
        syms = [b2u[b] for b in w.encode("utf-8")]
        syms[-1] = syms[-1] + "</w>"
        cur = syms[0]
        for s in syms[1:]:
            pair = (cur, s)
            cur = cur + s
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
                vocab.append(cur)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    ids = {}
    for v in vocab:
        if v not in ids:
            ids[v] = len(ids)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(ids, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
    }
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    cfg = dict(special)
    cfg.update({"model_max_length": SEQ, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"})
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return len(ids)


def init(rng, name, shape, scale):
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def text_encoder(rng, vocab_size):
    inits = [
        init(rng, "tok_emb", [vocab_size, D], 1.0),
        init(rng, "pos_emb", [SEQ, D], 0.3),
        init(rng, "w1", [D, D], 1.0 / np.sqrt(D)),
        init(rng, "b1", [D], 0.1),
        numpy_helper.from_array(np.ones(D, np.float32), "ln_g"),
        numpy_helper.from_array(np.zeros(D, np.float32), "ln_b"),
    ]
    nodes = [
        helper.make_node("Gather", ["tok_emb", "input_ids"], ["x0"], axis=0),
        helper.make_node("Add", ["x0", "pos_emb"], ["x1"]),
        helper.make_node("MatMul", ["x1", "w1"], ["x2"]),
        helper.make_node("Add", ["x2", "b1"], ["x3"]),
        helper.make_node("Tanh", ["x3"], ["x4"]),
        helper.make_node("Add", ["x1", "x4"], ["x5"]),
        helper.make_node("LayerNormalization", ["x5", "ln_g", "ln_b"], ["last_hidden_state"], axis=-1),
        helper.make_node("ReduceMean", ["last_hidden_state"], ["pooler_output"], axes=[1], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "text_encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT32, ["batch_size", "sequence_length"])],
        [
            helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch_size", "sequence_length", D]),
            helper.make_tensor_value_info("pooler_output", TensorProto.FLOAT, ["batch_size", D]),
        ],
        inits,
    )
    return graph


def unet(rng, timestep_type, cross_dim=D):
    freqs = np.exp(-np.log(10000.0) * np.arange(C // 2) / (C // 2)).astype(np.float32).reshape(1, C // 2)
    inits = [
        init(rng, "conv_in_w", [C, 4, 3, 3], 1.0 / np.sqrt(4 * 9)),
        init(rng, "conv_in_b", [C], 0.1),
        numpy_helper.from_array(freqs, "freqs"),
        init(rng, "temb_w", [C, C], 0.5 / np.sqrt(C)),
        init(rng, "wq", [C, C], 1.0 / np.sqrt(C)),
        init(rng, "wk", [cross_dim, C], 1.0 / np.sqrt(cross_dim)),
        init(rng, "wv", [cross_dim, C], 1.0 / np.sqrt(cross_dim)),
        init(rng, "conv_out_w", [4, C, 3, 3], 1.0 / np.sqrt(C * 9)),
        init(rng, "conv_out_b", [4], 0.05),
        numpy_helper.from_array(np.array([-1, 1], np.int64), "shape_col"),
        numpy_helper.from_array(np.array([0, 0, -1], np.int64), "shape_flat"),
        numpy_helper.from_array(np.array([2, 3], np.int64), "axes_23"),
        numpy_helper.from_array(np.array(1.0 / np.sqrt(C), np.float32), "attn_scale"),
    ]
    nodes = [
        # Timestep embedding: sin/cos of t * freqs, broadcast over the batch ([1] or [batch] or scalar).
        helper.make_node("Cast", ["timestep"], ["t_f"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["t_f", "shape_col"], ["t_col"]),
        helper.make_node("Mul", ["t_col", "freqs"], ["t_arg"]),
        helper.make_node("Sin", ["t_arg"], ["t_sin"]),
        helper.make_node("Cos", ["t_arg"], ["t_cos"]),
        helper.make_node("Concat", ["t_sin", "t_cos"], ["t_emb0"], axis=1),
        helper.make_node("MatMul", ["t_emb0", "temb_w"], ["t_emb1"]),
        helper.make_node("Unsqueeze", ["t_emb1", "axes_23"], ["t_emb"]),
        helper.make_node("Conv", ["sample", "conv_in_w", "conv_in_b"], ["h0"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["h0", "t_emb"], ["h1"]),
        helper.make_node("Sigmoid", ["h1"], ["h1_sig"]),
        helper.make_node("Mul", ["h1", "h1_sig"], ["h2"]),
        # Cross-attention: queries from the image, keys and values from the text.
        helper.make_node("Shape", ["h2"], ["h2_shape"]),
        helper.make_node("Reshape", ["h2", "shape_flat"], ["h2_flat"]),
        helper.make_node("Transpose", ["h2_flat"], ["h2_t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["h2_t", "wq"], ["q"]),
        helper.make_node("MatMul", ["encoder_hidden_states", "wk"], ["k"]),
        helper.make_node("MatMul", ["encoder_hidden_states", "wv"], ["v"]),
        helper.make_node("Transpose", ["k"], ["k_t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "k_t"], ["scores0"]),
        helper.make_node("Mul", ["scores0", "attn_scale"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["attn"]),
        helper.make_node("Transpose", ["attn"], ["attn_t"], perm=[0, 2, 1]),
        helper.make_node("Reshape", ["attn_t", "h2_shape"], ["attn_img"]),
        helper.make_node("Add", ["h2", "attn_img"], ["h3"]),
        helper.make_node("Conv", ["h3", "conv_out_w", "conv_out_b"], ["out_sample"], pads=[1, 1, 1, 1]),
    ]
    t_shape = ["steps"] if timestep_type is not None else []
    graph = helper.make_graph(
        nodes,
        "unet",
        [
            helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch_size", 4, "height", "width"]),
            helper.make_tensor_value_info("timestep", timestep_type, t_shape),
            helper.make_tensor_value_info("encoder_hidden_states", TensorProto.FLOAT, ["batch_size", "sequence_length", cross_dim]),
        ],
        [helper.make_tensor_value_info("out_sample", TensorProto.FLOAT, ["batch_size", 4, "height", "width"])],
        inits,
    )
    return graph


def vae_decoder(rng):
    inits = [
        init(rng, "post_w", [C, 4, 1, 1], 1.0),
        init(rng, "post_b", [C], 0.1),
        numpy_helper.from_array(np.array([1, 1, 8, 8], np.float32), "scales"),
        init(rng, "rgb_w", [3, C, 3, 3], 1.0 / np.sqrt(C * 9)),
        init(rng, "rgb_b", [3], 0.1),
    ]
    nodes = [
        helper.make_node("Conv", ["latent_sample", "post_w", "post_b"], ["z0"]),
        helper.make_node("Tanh", ["z0"], ["z1"]),
        helper.make_node("Resize", ["z1", "", "scales"], ["z2"], mode="nearest"),
        helper.make_node("Conv", ["z2", "rgb_w", "rgb_b"], ["z3"], pads=[1, 1, 1, 1]),
        helper.make_node("Tanh", ["z3"], ["sample"]),
    ]
    graph = helper.make_graph(
        nodes,
        "vae_decoder",
        [helper.make_tensor_value_info("latent_sample", TensorProto.FLOAT, ["batch_size", 4, "latent_height", "latent_width"])],
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch_size", 3, "height", "width"])],
        inits,
    )
    return graph


def to_fp16_io(graph, keep_inputs=()):
    """fp16 initializers and fp16 float inputs/outputs, computing in fp32 inside (Cast nodes)."""
    nodes = []
    inits = []
    for t in graph.initializer:
        arr = numpy_helper.to_array(t)
        if arr.dtype == np.float32:
            inits.append(numpy_helper.from_array(arr.astype(np.float16), t.name + "_fp16"))
            nodes.append(helper.make_node("Cast", [t.name + "_fp16"], [t.name], to=TensorProto.FLOAT))
        else:
            inits.append(t)
    inputs = []
    for i in graph.input:
        tt = i.type.tensor_type
        if tt.elem_type == TensorProto.FLOAT and i.name not in keep_inputs:
            dims = [d.dim_param if d.dim_param else d.dim_value for d in tt.shape.dim]
            inputs.append(helper.make_tensor_value_info(i.name, TensorProto.FLOAT16, dims))
            nodes.append(helper.make_node("Cast", [i.name], [i.name + "__f32"], to=TensorProto.FLOAT))
        else:
            inputs.append(i)
    renamed = {i.name: i.name + "__f32" for i in graph.input if i.type.tensor_type.elem_type == TensorProto.FLOAT and i.name not in keep_inputs}
    out_names = {o.name for o in graph.output}
    for n in graph.node:
        n2 = onnx.NodeProto()
        n2.CopyFrom(n)
        for k, name in enumerate(n2.input):
            if name in renamed:
                n2.input[k] = renamed[name]
        for k, name in enumerate(n2.output):
            if name in out_names:
                n2.output[k] = name + "__out32"
        # Consumers of a graph output inside the graph read the fp32 copy.
        for k, name in enumerate(n2.input):
            if name in out_names:
                n2.input[k] = name + "__out32"
        nodes.append(n2)
    outputs = []
    for o in graph.output:
        dims = [d.dim_param if d.dim_param else d.dim_value for d in o.type.tensor_type.shape.dim]
        nodes.append(helper.make_node("Cast", [o.name + "__out32"], [o.name], to=TensorProto.FLOAT16))
        outputs.append(helper.make_tensor_value_info(o.name, TensorProto.FLOAT16, dims))
    return helper.make_graph(nodes, graph.name, inputs, outputs, inits)


# Builder name -> (PyTorch parameter, permutation from the PyTorch to the ONNX layout).
ATTN = "mid_block.attentions.0.transformer_blocks.0.attn2"
UNET_PARAMS = {
    "conv_in_w": ("conv_in.weight", None),
    "conv_in_b": ("conv_in.bias", None),
    "temb_w": ("time_embedding.linear_1.weight", [1, 0]),
    "wq": (ATTN + ".to_q.weight", [1, 0]),
    "wk": (ATTN + ".to_k.weight", [1, 0]),
    "wv": (ATTN + ".to_v.weight", [1, 0]),
    "conv_out_w": ("conv_out.weight", None),
    "conv_out_b": ("conv_out.bias", None),
}
TE_PARAMS = {
    "tok_emb": ("text_model.embeddings.token_embedding.weight", None),
    "pos_emb": ("text_model.embeddings.position_embedding.weight", None),
    "w1": ("text_model.encoder.layers.0.mlp.fc1.weight", [1, 0]),
    "b1": ("text_model.encoder.layers.0.mlp.fc1.bias", None),
    "ln_g": ("text_model.final_layer_norm.weight", None),
    "ln_b": ("text_model.final_layer_norm.bias", None),
}


def export_names(graph, params, first_matmul):
    """Renames the builder's initializers as torch.onnx would; returns the PyTorch state dict."""
    renames, state = {}, {}
    n = first_matmul
    for init in graph.initializer:
        if init.name not in params:
            continue
        torch_name, perm = params[init.name]
        arr = numpy_helper.to_array(init)
        if perm is None:
            renames[init.name] = torch_name
            state[torch_name] = arr
        else:
            renames[init.name] = f"onnx::MatMul_{n}"
            n += 1
            state[torch_name] = arr.transpose(np.argsort(perm))
    for init in graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in graph.node:
        for k, name in enumerate(node.input):
            node.input[k] = renames.get(name, name)
    return state


def write_name_map(path, state, component):
    m, unmatched = name_map.build(onnx.load(path), state, component)
    assert not unmatched, f"{path}: unmatched {unmatched}"
    name_map.save(m, os.path.join(os.path.dirname(path), "name_map.json"))


def save(graph, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="corral-make-tiny-sd")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def write_variant(root, fp16):
    rng = np.random.default_rng(20240601)  # same weights for both variants
    name = "tiny-sd-fp16" if fp16 else "tiny-sd"
    out = os.path.join(root, name)
    pad = "!" if fp16 else "<|endoftext|>"
    vocab_size = make_tokenizer(os.path.join(out, "tokenizer"), pad)
    te = text_encoder(rng, vocab_size)
    un = unet(rng, TensorProto.FLOAT16 if fp16 else TensorProto.INT64)
    vae = vae_decoder(rng)
    te_state = export_names(te, TE_PARAMS, 201)
    un_state = export_names(un, UNET_PARAMS, 2301)
    if fp16:
        te = to_fp16_io(te)
        un = to_fp16_io(un)
        vae = to_fp16_io(vae)
    save(te, os.path.join(out, "text_encoder", "model.onnx"))
    save(un, os.path.join(out, "unet", "model.onnx"))
    write_name_map(os.path.join(out, "text_encoder", "model.onnx"), te_state, "text_encoder")
    write_name_map(os.path.join(out, "unet", "model.onnx"), un_state, "unet")
    # As optimum exports it: the coordinator reads the family from cross_attention_dim.
    with open(os.path.join(out, "unet", "config.json"), "w") as f:
        json.dump({"_class_name": "UNet2DConditionModel", "cross_attention_dim": D}, f, indent=2)
    save(vae, os.path.join(out, "vae_decoder", "model.onnx"))
    with open(os.path.join(out, "vae_decoder", "config.json"), "w") as f:
        json.dump({"_class_name": "AutoencoderKL", "latent_channels": 4, "scaling_factor": 0.18215}, f, indent=2)
    if fp16:
        sched = {
            "_class_name": "EulerDiscreteScheduler",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000,
            "prediction_type": "v_prediction",
            "timestep_spacing": "trailing",
            "steps_offset": 1,
            "set_alpha_to_one": False,
        }
    else:
        sched = {
            "_class_name": "PNDMScheduler",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000,
            "set_alpha_to_one": False,
            "skip_prk_steps": True,
            "steps_offset": 1,
            "clip_sample": False,
            "trained_betas": None,
        }
    os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
    with open(os.path.join(out, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(sched, f, indent=2)
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.30.0",
        "requires_safety_checker": False,
        "scheduler": ["diffusers", sched["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae_decoder": ["diffusers", "AutoencoderKL"],
    }
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    print("wrote", out)


# ---------------------------------------------------------------- part 2: encoder, SDXL, upscaler
def vae_encoder(rng, latent_channels=4):
    """sample [b, 3, H, W] in [-1, 1] -> latent_parameters [b, 2 * latent, H/8, W/8]: mean and
    log-variance, as optimum exports diffusers' AutoencoderKL encoder."""
    bias = np.concatenate([rng.standard_normal(latent_channels) * 0.1, np.full(latent_channels, -3.0)]).astype(np.float32)
    inits = [
        init(rng, "enc_w", [2 * latent_channels, 3, 1, 1], 1.5),
        numpy_helper.from_array(bias, "enc_b"),
    ]
    nodes = [
        helper.make_node("AveragePool", ["sample"], ["pooled"], kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Conv", ["pooled", "enc_w", "enc_b"], ["latent_parameters"]),
    ]
    return helper.make_graph(
        nodes,
        "vae_encoder",
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch_size", 3, "sample_height", "sample_width"])],
        [helper.make_tensor_value_info("latent_parameters", TensorProto.FLOAT, ["batch_size", 2 * latent_channels, "latent_height", "latent_width"])],
        inits,
    )


def clip_encoder(rng, vocab_size, dim, layers, projection):
    """A CLIP-shaped text encoder with optimum's SDXL outputs: hidden_states.0..layers (the
    embeddings, then each layer), last_hidden_state (final layer norm) and pooler_output, or
    text_embeds (the pooled state through a projection) for CLIPTextModelWithProjection."""
    inits = [
        init(rng, "tok_emb", [vocab_size, dim], 1.0),
        init(rng, "pos_emb", [SEQ, dim], 0.3),
        numpy_helper.from_array(np.ones(dim, np.float32), "ln_g"),
        numpy_helper.from_array(np.zeros(dim, np.float32), "ln_b"),
    ]
    nodes = [
        helper.make_node("Gather", ["tok_emb", "input_ids"], ["x0"], axis=0),
        helper.make_node("Add", ["x0", "pos_emb"], ["hidden_states.0"]),
    ]
    x = "hidden_states.0"
    for k in range(layers):
        inits += [init(rng, f"w{k}", [dim, dim], 1.0 / np.sqrt(dim)), init(rng, f"b{k}", [dim], 0.1)]
        nodes += [
            helper.make_node("MatMul", [x, f"w{k}"], [f"m{k}"]),
            helper.make_node("Add", [f"m{k}", f"b{k}"], [f"a{k}"]),
            helper.make_node("Tanh", [f"a{k}"], [f"t{k}"]),
            helper.make_node("Add", [x, f"t{k}"], [f"hidden_states.{k + 1}"]),
        ]
        x = f"hidden_states.{k + 1}"
    nodes.append(helper.make_node("LayerNormalization", [x, "ln_g", "ln_b"], ["last_hidden_state"], axis=-1))
    nodes.append(helper.make_node("ReduceMean", ["last_hidden_state"], ["pooled"], axes=[1], keepdims=0))
    dims = ["batch_size", "sequence_length", dim]
    outputs = []
    if projection:
        inits.append(init(rng, "proj", [dim, dim], 1.0 / np.sqrt(dim)))
        nodes.append(helper.make_node("MatMul", ["pooled", "proj"], ["text_embeds"]))
        outputs.append(helper.make_tensor_value_info("text_embeds", TensorProto.FLOAT, ["batch_size", dim]))
        outputs.append(helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, dims))
    else:
        nodes.append(helper.make_node("Identity", ["pooled"], ["pooler_output"]))
        outputs.append(helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, dims))
        outputs.append(helper.make_tensor_value_info("pooler_output", TensorProto.FLOAT, ["batch_size", dim]))
    outputs += [helper.make_tensor_value_info(f"hidden_states.{k}", TensorProto.FLOAT, dims) for k in range(layers + 1)]
    graph = helper.make_graph(
        nodes,
        "text_encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT32, ["batch_size", "sequence_length"])],
        outputs,
        inits,
    )
    return graph


XL_D1, XL_D2, XL_LAYERS = 32, 48, 2


def sdxl_unet(rng):
    """The tiny UNet with SDXL's added conditioning: text_embeds [b, D2] and time_ids [b, 6],
    embedded (sin/cos of each id) and projected into the time embedding."""
    graph = unet(rng, TensorProto.INT64, cross_dim=XL_D1 + XL_D2)
    freqs = np.exp(-np.log(10000.0) * np.arange(4) / 4).astype(np.float32).reshape(1, 1, 4)
    inits = [
        numpy_helper.from_array(freqs, "add_freqs"),
        numpy_helper.from_array(np.array([0, -1], np.int64), "shape_add"),
        numpy_helper.from_array(np.array([0, 6, 1], np.int64), "shape_ids"),
        init(rng, "add_w", [6 * 8 + XL_D2, C], 0.3 / np.sqrt(6 * 8 + XL_D2)),
    ]
    nodes = [
        helper.make_node("Reshape", ["time_ids", "shape_ids"], ["ids3"]),
        helper.make_node("Mul", ["ids3", "add_freqs"], ["ids_arg"]),
        helper.make_node("Sin", ["ids_arg"], ["ids_sin"]),
        helper.make_node("Cos", ["ids_arg"], ["ids_cos"]),
        helper.make_node("Concat", ["ids_sin", "ids_cos"], ["ids_emb3"], axis=2),
        helper.make_node("Reshape", ["ids_emb3", "shape_add"], ["ids_emb"]),
        helper.make_node("Concat", ["text_embeds", "ids_emb"], ["add_in"], axis=1),
        helper.make_node("MatMul", ["add_in", "add_w"], ["add_emb"]),
        helper.make_node("Add", ["t_emb1_base", "add_emb"], ["t_emb1"]),
    ]
    for n in graph.node:
        for k, o in enumerate(n.output):
            if o == "t_emb1":
                n.output[k] = "t_emb1_base"
    # The added-conditioning nodes go right after the node producing t_emb1_base.
    at = [i for i, n in enumerate(graph.node) if "t_emb1_base" in n.output][0] + 1
    new_nodes = list(graph.node[:at]) + nodes + list(graph.node[at:])
    inputs = list(graph.input) + [
        helper.make_tensor_value_info("text_embeds", TensorProto.FLOAT, ["batch_size", XL_D2]),
        helper.make_tensor_value_info("time_ids", TensorProto.FLOAT, ["batch_size", 6]),
    ]
    return helper.make_graph(new_nodes, "unet", inputs, list(graph.output), list(graph.initializer) + inits)


def write_sdxl(root):
    rng = np.random.default_rng(20240902)
    out = os.path.join(root, "tiny-sdxl")
    vocab = make_tokenizer(os.path.join(out, "tokenizer"), "<|endoftext|>")
    make_tokenizer(os.path.join(out, "tokenizer_2"), "!")
    te1 = clip_encoder(rng, vocab, XL_D1, XL_LAYERS, projection=False)
    te2 = clip_encoder(rng, vocab, XL_D2, XL_LAYERS, projection=True)
    un = sdxl_unet(rng)
    vae = vae_decoder(rng)
    enc = vae_encoder(rng)
    te_params = lambda: {
        "tok_emb": ("text_model.embeddings.token_embedding.weight", None),
        "pos_emb": ("text_model.embeddings.position_embedding.weight", None),
        **{f"w{k}": (f"text_model.encoder.layers.{k}.mlp.fc1.weight", [1, 0]) for k in range(XL_LAYERS)},
        **{f"b{k}": (f"text_model.encoder.layers.{k}.mlp.fc1.bias", None) for k in range(XL_LAYERS)},
        "ln_g": ("text_model.final_layer_norm.weight", None),
        "ln_b": ("text_model.final_layer_norm.bias", None),
    }
    te1_state = export_names(te1, te_params(), 301)
    te2_params = te_params()
    te2_params["proj"] = ("text_projection.weight", [1, 0])
    te2_state = export_names(te2, te2_params, 401)
    unet_params = dict(UNET_PARAMS)
    unet_params["add_w"] = ("add_embedding.linear_1.weight", [1, 0])
    un_state = export_names(un, unet_params, 2301)
    for name, graph in (("text_encoder", te1), ("text_encoder_2", te2), ("unet", un), ("vae_decoder", vae), ("vae_encoder", enc)):
        save(graph, os.path.join(out, name, "model.onnx"))
    write_name_map(os.path.join(out, "text_encoder", "model.onnx"), te1_state, "text_encoder")
    write_name_map(os.path.join(out, "text_encoder_2", "model.onnx"), te2_state, "text_encoder_2")
    write_name_map(os.path.join(out, "unet", "model.onnx"), un_state, "unet")
    vae_cfg = {"_class_name": "AutoencoderKL", "latent_channels": 4, "scaling_factor": 0.13025, "force_upcast": True}
    for part in ("vae_decoder", "vae_encoder"):
        with open(os.path.join(out, part, "config.json"), "w") as f:
            json.dump(vae_cfg, f, indent=2)
    with open(os.path.join(out, "unet", "config.json"), "w") as f:
        json.dump({"_class_name": "UNet2DConditionModel", "sample_size": 128, "addition_time_embed_dim": 256,
                   "cross_attention_dim": XL_D1 + XL_D2}, f, indent=2)
    sched = {
        "_class_name": "EulerDiscreteScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
        "steps_offset": 1,
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
    }
    os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
    with open(os.path.join(out, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(sched, f, indent=2)
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": "0.30.0",
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae_decoder": ["diffusers", "AutoencoderKL"],
        "vae_encoder": ["diffusers", "AutoencoderKL"],
    }
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    print("wrote", out)


def write_vae_bundle(root):
    """fixtures/tiny-vae/: a separate VAE (decoder only) for tiny-sd, other weights."""
    rng = np.random.default_rng(4242)
    out = os.path.join(root, "tiny-vae")
    save(vae_decoder(rng), os.path.join(out, "vae_decoder", "model.onnx"))
    with open(os.path.join(out, "vae_decoder", "config.json"), "w") as f:
        json.dump({"_class_name": "AutoencoderKL", "latent_channels": 4, "scaling_factor": 0.18215}, f, indent=2)
    print("wrote", out)


def write_upscaler(root):
    """fixtures/upscaler-x2/model.onnx: a Real-ESRGAN-shaped x2 network (RGB [1, 3, h, w] in
    [0, 1] -> [1, 3, 2h, 2w]): nearest upsampling plus a residual of two 3x3 convolutions and a
    pixel shuffle, so each output pixel sees a 5x5 input window."""
    rng = np.random.default_rng(99)
    inits = [
        init(rng, "c1_w", [12, 3, 3, 3], 0.3),
        init(rng, "c1_b", [12], 0.05),
        init(rng, "c2_w", [12, 12, 3, 3], 0.1),
        init(rng, "c2_b", [12], 0.02),
        numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "up_scales"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "c1_w", "c1_b"], ["h1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("Conv", ["h2", "c2_w", "c2_b"], ["h3"], pads=[1, 1, 1, 1]),
        helper.make_node("DepthToSpace", ["h3"], ["res"], blocksize=2, mode="CRD"),
        helper.make_node("Resize", ["input", "", "up_scales"], ["up"], mode="nearest"),
        helper.make_node("Add", ["up", "res"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "upscaler",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, "height", "width"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, "height_x2", "width_x2"])],
        inits,
    )
    save(graph, os.path.join(root, "upscaler-x2", "model.onnx"))
    print("wrote", os.path.join(root, "upscaler-x2"))


def write_png(path, rgb):
    """An 8-bit RGB PNG from an [h, w, 3] uint8 array (zlib, no filter)."""
    import struct
    import zlib

    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(kind, data):
        c = struct.pack(">I", len(data)) + kind + data
        return c + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)


def write_images(root):
    """fixtures/images/: a smooth 48x64 test picture as PNG (and as JPEG when Pillow is there)."""
    out = os.path.join(root, "images")
    os.makedirs(out, exist_ok=True)
    y, x = np.mgrid[0:64, 0:48].astype(np.float32)
    rgb = np.stack([
        128 + 100 * np.sin(x / 7.0),
        128 + 100 * np.cos(y / 9.0),
        128 + 60 * np.sin((x + y) / 11.0),
    ], axis=-1).clip(0, 255).astype(np.uint8)
    write_png(os.path.join(out, "init-48x64.png"), rgb)
    try:
        from PIL import Image

        Image.fromarray(rgb).save(os.path.join(out, "init-48x64.jpg"), quality=95)
    except ImportError:
        print("Pillow missing: fixtures/images/init-48x64.jpg not rewritten")
    print("wrote", out)


def write_io_variants(root):
    """Single graphs with other IO conventions real exports use, dropped into a copy of
    tiny-sd by the tests (same weights, so the same results as tiny-sd where t is integral):

    - unet-scalar-float-timestep.onnx: timestep float32 with shape [] (a scalar)
    - text_encoder-int64-ids.onnx:     input_ids int64
    - text_encoder-static-batch1.onnx: input_ids int32 [1, 77] (fixed batch of one)
    """
    src = os.path.join(root, "tiny-sd")
    out = os.path.join(root, "variants")
    os.makedirs(out, exist_ok=True)

    def set_input(model, name, elem_type, dims):
        for i in model.graph.input:
            if i.name == name:
                i.CopyFrom(helper.make_tensor_value_info(name, elem_type, dims))

    un = onnx.load(os.path.join(src, "unet", "model.onnx"))
    set_input(un, "timestep", TensorProto.FLOAT, [])
    onnx.checker.check_model(un)
    onnx.save(un, os.path.join(out, "unet-scalar-float-timestep.onnx"))
    te = onnx.load(os.path.join(src, "text_encoder", "model.onnx"))
    set_input(te, "input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
    onnx.checker.check_model(te)
    onnx.save(te, os.path.join(out, "text_encoder-int64-ids.onnx"))
    te = onnx.load(os.path.join(src, "text_encoder", "model.onnx"))
    set_input(te, "input_ids", TensorProto.INT32, [1, SEQ])
    for o in te.graph.output:
        dims = [1, SEQ, D] if o.name == "last_hidden_state" else [1, D]
        o.CopyFrom(helper.make_tensor_value_info(o.name, TensorProto.FLOAT, dims))
    onnx.checker.check_model(te)
    onnx.save(te, os.path.join(out, "text_encoder-static-batch1.onnx"))
    # A float16 VAE decoder that overflows (as SDXL's does in fp16): inf in its output.
    nodes = [
        helper.make_node("Cast", ["latent_sample"], ["z32"], to=TensorProto.FLOAT),
        helper.make_node("Conv", ["z32", "big_w"], ["z1"]),
        helper.make_node("Resize", ["z1", "", "scales"], ["z2"], mode="nearest"),
        helper.make_node("Cast", ["z2"], ["sample"], to=TensorProto.FLOAT16),
    ]
    inits = [
        numpy_helper.from_array(np.full([3, 4, 1, 1], 1e4, np.float32), "big_w"),
        numpy_helper.from_array(np.array([1, 1, 8, 8], np.float32), "scales"),
    ]
    g = helper.make_graph(
        nodes,
        "vae_decoder",
        [helper.make_tensor_value_info("latent_sample", TensorProto.FLOAT16, ["batch_size", 4, "latent_height", "latent_width"])],
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT16, ["batch_size", 3, "height", "width"])],
        inits,
    )
    save(g, os.path.join(out, "vae_decoder-fp16-overflow.onnx"))
    print("wrote", out)


def save_safetensors(tensors, path, metadata=None):
    """The safetensors layout: u64 header length, JSON header, then the tensors' bytes."""
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        arr = np.asarray(tensors[name])  # not ascontiguousarray: it turns 0-d alphas into [1]
        dtype = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}[arr.dtype]
        b = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for b in blobs:
            f.write(b)


def kohya_name(component, module):
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[component]
    return prefix + module.replace(".", "_")


def write_loras(root):
    """fixtures/loras/: LoRA A (rank 4, alpha 2: scale 0.5) on the cross-attention q/k/v and the
    text encoder's fc1, as kohya and as PEFT (lora_B pre-multiplied by the scale: power-of-two
    factors, so both give bit-identical merged weights); LoRA B (rank 2, alpha 2, fp16 tensors)
    on to_q, the time embedding and the 3x3 conv_out (a conv LoRA)."""
    out = os.path.join(root, "loras")
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(777)

    def lin(rank, n_out, n_in, s):
        return (rng.standard_normal((n_out, rank)) * s).astype(np.float32), (rng.standard_normal((rank, n_in)) * s).astype(np.float32)

    a_modules = {
        ("unet", ATTN + ".to_q"): lin(4, C, C, 0.35),
        ("unet", ATTN + ".to_k"): lin(4, C, D, 0.35),
        ("unet", ATTN + ".to_v"): lin(4, C, D, 0.35),
        ("text_encoder", "text_model.encoder.layers.0.mlp.fc1"): lin(4, D, D, 0.3),
    }
    kohya, peft = {}, {}
    for (component, module), (up, down) in a_modules.items():
        k = kohya_name(component, module)
        kohya[k + ".lora_up.weight"] = up
        kohya[k + ".lora_down.weight"] = down
        kohya[k + ".alpha"] = np.array(2.0, np.float32)
        p = f"{component}.{module}"
        peft[p + ".lora_A.weight"] = down
        peft[p + ".lora_B.weight"] = up * np.float32(0.5)
    save_safetensors(kohya, os.path.join(out, "tiny-a.kohya.safetensors"), {"ss_network_dim": "4", "ss_network_alpha": "2"})
    save_safetensors(peft, os.path.join(out, "tiny-a.peft.safetensors"))
    b = {}
    for module, (up, down) in {
        ATTN + ".to_q": lin(2, C, C, 0.4),
        "time_embedding.linear_1": lin(2, C, C, 0.4),
    }.items():
        k = kohya_name("unet", module)
        b[k + ".lora_up.weight"] = up.astype(np.float16)
        b[k + ".lora_down.weight"] = down.astype(np.float16)
        b[k + ".alpha"] = np.array(2.0, np.float16)
    k = kohya_name("unet", "conv_out")
    b[k + ".lora_down.weight"] = (rng.standard_normal((2, C, 3, 3)) * 0.2).astype(np.float16)
    b[k + ".lora_up.weight"] = (rng.standard_normal((4, 2, 1, 1)) * 0.2).astype(np.float16)
    b[k + ".alpha"] = np.array(2.0, np.float16)
    save_safetensors(b, os.path.join(out, "tiny-b.kohya.safetensors"))
    # LoRA C for tiny-sdxl: kohya's SDXL naming (the UNet in the original ldm/sgm names,
    # lora_te1_/lora_te2_) and the same LoRA in diffusers/PEFT names.
    c_modules = {
        ("unet", "middle_block_1_transformer_blocks_0_attn2_to_k", ATTN + ".to_k"): lin(2, C, XL_D1 + XL_D2, 0.3),
        ("unet", "middle_block_1_transformer_blocks_0_attn2_to_q", ATTN + ".to_q"): lin(2, C, C, 0.3),
        ("text_encoder", "text_model_encoder_layers_1_mlp_fc1", "text_model.encoder.layers.1.mlp.fc1"): lin(2, XL_D1, XL_D1, 0.3),
        ("text_encoder_2", "text_model_encoder_layers_0_mlp_fc1", "text_model.encoder.layers.0.mlp.fc1"): lin(2, XL_D2, XL_D2, 0.3),
    }
    kohya, peft = {}, {}
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    for (component, sgm, module), (up, down) in c_modules.items():
        k = prefixes[component] + sgm
        kohya[k + ".lora_up.weight"], kohya[k + ".lora_down.weight"] = up, down
        kohya[k + ".alpha"] = np.array(2.0, np.float32)
        p = f"{component}.{module}"
        peft[p + ".lora_A.weight"], peft[p + ".lora_B.weight"] = down, up
    save_safetensors(kohya, os.path.join(out, "tiny-c-sdxl.kohya.safetensors"))
    save_safetensors(peft, os.path.join(out, "tiny-c-sdxl.peft.safetensors"))
    print("wrote", out)


if __name__ == "__main__":
    root = sys.argv[1] if len(sys.argv) > 1 else "fixtures"
    write_variant(root, fp16=False)
    write_variant(root, fp16=True)
    write_io_variants(root)
    write_loras(root)
    enc = vae_encoder(np.random.default_rng(5150))
    save(enc, os.path.join(root, "tiny-sd", "vae_encoder", "model.onnx"))
    with open(os.path.join(root, "tiny-sd", "vae_encoder", "config.json"), "w") as f:
        json.dump({"_class_name": "AutoencoderKL", "latent_channels": 4, "scaling_factor": 0.18215}, f, indent=2)
    write_sdxl(root)
    write_vae_bundle(root)
    write_upscaler(root)
    write_images(root)
