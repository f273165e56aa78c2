#!/usr/bin/env python3
"""numpy + onnxruntime reference of Corral's Stable Diffusion pipeline (src/pipeline).

It mirrors diffusers' mathematics (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
DDIMScheduler with eta 0, DPMSolverMultistepScheduler dpmsolver++ order 2 midpoint, with and
without Karras sigmas), CLIP's BPE tokenizer (without ftfy), and Corral's documented noise
generator, and writes golden vectors that tests/pipeline.rs compares the Rust pipeline against:

  fixtures/golden/<fixture>/meta.json            request, token ids, tolerances
  fixtures/golden/<fixture>/noise.f32            initial standard-normal noise [n,4,h/8,w/8]
  fixtures/golden/<fixture>/<sched>.latents.f32  final latents (before 1/scaling_factor)
  fixtures/golden/<fixture>/euler.image.f32      decoded image [n,3,h,w] in [-1, 1]
  fixtures/golden/<fixture>/<set>.<sched>.latents.f32  final latents with a LoRA set (meta.json
                                                 "lora_sets") merged into the weights

LoRAs are merged the plain way: read the safetensors file, W += weight * alpha/rank * up @ down
on the initializer that <component>/name_map.json names (in its layout), then build the sessions
from the modified models. Those models also list the linear and conv weights of the name map as
graph inputs (their merged values stay the defaults): Corral patches weights through such inputs,
and ONNX Runtime picks other convolution kernels for a weight that is an input (no pre-packed
NCHWc layout), whose rounding differs. Mirroring that keeps the comparison about the merge.

All .f32 files are raw little-endian float32. Run once: python3 scripts/reference_sd.py
With --print-schedules it prints the timesteps/sigmas used as constants in the Rust unit tests.
"""
import json
import math
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
import regex
from onnx import numpy_helper

MASK64 = (1 << 64) - 1
ANCESTRAL_STREAM_KEY = 0xA5A5A5A5A5A5A5A5
VAE_ENCODE_STREAM_KEY = 0x3C3C3C3C3C3C3C3C


# ---------------------------------------------------------------- noise (src/pipeline/noise.rs)
class NoiseRng:
    """SplitMix64 + Box-Muller (cosine branch only), computed in float64, rounded to float32."""

    def __init__(self, seed):
        self.state = seed & MASK64

    def next_u64(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    def normal(self):
        u1 = ((self.next_u64() >> 11) + 1) * (1.0 / (1 << 53))  # (0, 1]
        u2 = (self.next_u64() >> 11) * (1.0 / (1 << 53))  # [0, 1)
        return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)

    def normals(self, n):
        return np.array([self.normal() for _ in range(n)], dtype=np.float64).astype(np.float32)


def initial_noise(seed, n_images, shape):
    return np.stack([NoiseRng((seed + i) & MASK64).normals(int(np.prod(shape))).reshape(shape) for i in range(n_images)])


# ---------------------------------------------------------------- tokenizer
def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


class ClipTokenizer:
    PAT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)

    def __init__(self, d):
        self.vocab = json.load(open(os.path.join(d, "vocab.json"), encoding="utf-8"))
        lines = open(os.path.join(d, "merges.txt"), encoding="utf-8").read().split("\n")[1:]
        merges = [tuple(l.split()) for l in lines if l.strip()]
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.b2u = bytes_to_unicode()
        cfg = json.load(open(os.path.join(d, "tokenizer_config.json")))
        self.max_len = cfg.get("model_max_length", 77)
        self.bos = self.vocab["<|startoftext|>"]
        self.eos = self.vocab["<|endoftext|>"]
        self.pad = self.vocab[cfg.get("pad_token", "<|endoftext|>")]

    def bpe(self, token):
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = [(word[i], word[i + 1]) for i in range(len(word) - 1)]
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            new, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    new.append(word[i] + word[i + 1])
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = tuple(new)
        return word

    def encode(self, text):
        text = " ".join(text.split()).strip().lower()
        ids = []
        for tok in self.PAT.findall(text):
            tok = "".join(self.b2u[b] for b in tok.encode("utf-8"))
            ids.extend(self.vocab[t] for t in self.bpe(tok))
        ids = [self.bos] + ids[: self.max_len - 2] + [self.eos]
        return ids + [self.pad] * (self.max_len - len(ids))


# ---------------------------------------------------------------- schedulers (diffusers' maths)
DEFAULT_SPACING = {"euler": "linspace", "euler_a": "linspace", "ddim": "leading", "dpmpp_2m": "linspace", "dpmpp_2m_karras": "linspace"}


def alphas_cumprod(cfg):
    n = cfg["num_train_timesteps"]
    if cfg.get("beta_schedule", "linear") == "scaled_linear":
        betas = np.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n, dtype=np.float32) ** 2
    else:
        betas = np.linspace(cfg["beta_start"], cfg["beta_end"], n, dtype=np.float32)
    return np.cumprod(1.0 - betas, axis=0)


def spacing(cfg, name):
    return cfg.get("timestep_spacing") or DEFAULT_SPACING[name]


def euler_timesteps(cfg, name, steps):
    n, sp, off = cfg["num_train_timesteps"], spacing(cfg, name), cfg.get("steps_offset", 0)
    if sp == "linspace":
        return np.linspace(0, n - 1, steps, dtype=np.float64)[::-1].copy()
    if sp == "leading":
        ratio = n // steps
        return (np.arange(0, steps) * ratio).round()[::-1].copy().astype(np.float64) + off
    ratio = n / steps
    return (np.arange(n, 0, -ratio)).round().copy().astype(np.float64) - 1


def ddim_timesteps(cfg, steps):
    n, sp, off = cfg["num_train_timesteps"], spacing(cfg, "ddim"), cfg.get("steps_offset", 0)
    if sp == "linspace":
        return np.linspace(0, n - 1, steps).round()[::-1].copy().astype(np.int64)
    if sp == "leading":
        ratio = n // steps
        return (np.arange(0, steps) * ratio).round()[::-1].copy().astype(np.int64) + off
    ratio = n / steps
    return np.round(np.arange(n, 0, -ratio)).astype(np.int64) - 1


def dpm_timesteps(cfg, steps):
    n, sp, off = cfg["num_train_timesteps"], spacing(cfg, "dpmpp_2m"), cfg.get("steps_offset", 0)
    if sp == "linspace":
        return np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
    if sp == "leading":
        ratio = n // (steps + 1)
        return (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + off
    ratio = n / steps
    return np.arange(n, 0, -ratio).round().copy().astype(np.int64) - 1


def sigma_to_t(sigma, log_sigmas):
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(np.shape(sigma))


def schedule(cfg, name, steps):
    """Returns (timesteps, sigmas float32 incl. final 0, init_noise_sigma) as diffusers' set_timesteps."""
    ac = alphas_cumprod(cfg)
    full = ((1 - ac) / ac) ** 0.5
    if name in ("euler", "euler_a"):
        ts = euler_timesteps(cfg, name, steps)
        sig = np.interp(ts, np.arange(0, len(full)), full)
        sig = np.concatenate([sig, [0.0]]).astype(np.float32)
        if spacing(cfg, name) in ("linspace", "trailing"):
            init = float(sig.max())
        else:
            init = float((sig.max() ** 2 + 1) ** 0.5)
        return ts.astype(np.float32), sig, init
    if name == "ddim":
        return ddim_timesteps(cfg, steps), None, 1.0
    ts = dpm_timesteps(cfg, steps)
    if name == "dpmpp_2m_karras":
        log_sigmas = np.log(full)
        s = np.flip(full).copy()
        smin, smax = float(s[-1]), float(s[0])  # diffusers uses .item(): float64
        ramp = np.linspace(0, 1, steps)
        rho = 7.0
        s = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
        ts = np.array([sigma_to_t(x, log_sigmas) for x in s]).round().astype(np.int64)
        sig = np.concatenate([s, [0.0]]).astype(np.float32)
    else:
        sig = np.interp(ts, np.arange(0, len(full)), full)
        sig = np.concatenate([sig, [0.0]]).astype(np.float32)
    return ts, sig, 1.0


class Sampler:
    def __init__(self, cfg, name, steps, seeds, latent_shape):
        self.cfg, self.name, self.steps = cfg, name, steps
        self.ts, self.sigmas, self.init_sigma = schedule(cfg, name, steps)
        self.ac = alphas_cumprod(cfg)
        self.pred = cfg.get("prediction_type", "epsilon")
        self.outputs = []
        self.rngs = [NoiseRng((s ^ ANCESTRAL_STREAM_KEY) & MASK64) for s in seeds]
        self.latent_shape = latent_shape

    def add_noise(self, x0, noise, i):
        """diffusers' add_noise at step i (the first step img2img runs)."""
        f = np.float32
        if self.name in ("euler", "euler_a"):
            return x0 + noise * self.sigmas[i]
        if self.name == "ddim":
            a = self.ac[int(self.ts[i])]
            return np.sqrt(a) * x0 + np.sqrt(f(1) - a) * noise
        sig = self.sigmas[i]
        alpha = f(1) / np.sqrt(sig * sig + f(1))
        return alpha * x0 + (sig * alpha) * noise

    def scale_input(self, x, i):
        if self.name not in ("euler", "euler_a"):
            return x  # DDIM and DPM-Solver++ take the sample unscaled
        s = self.sigmas[i]
        return x / np.float32((float(s) ** 2 + 1) ** 0.5)

    def step(self, eps, i, x):
        f = np.float32
        if self.name in ("euler", "euler_a"):
            s = float(self.sigmas[i])
            if self.pred == "epsilon":
                x0 = x - f(s) * eps
            else:
                x0 = eps * f(-s / (s * s + 1) ** 0.5) + x / f(s * s + 1)
            d = (x - x0) / f(s)
            if self.name == "euler":
                return x + d * f(float(self.sigmas[i + 1]) - s)
            st = float(self.sigmas[i + 1])
            up = (st**2 * (s**2 - st**2) / s**2) ** 0.5
            down = (st**2 - up**2) ** 0.5
            prev = x + d * f(down - s)
            n = int(np.prod(self.latent_shape))
            noise = np.stack([r.normals(n).reshape(self.latent_shape) for r in self.rngs])
            return prev + noise * f(up)
        if self.name == "ddim":
            t = int(self.ts[i])
            prev_t = t - self.cfg["num_train_timesteps"] // self.steps
            a = float(self.ac[t])
            final = 1.0 if self.cfg.get("set_alpha_to_one", True) else float(self.ac[0])
            ap = float(self.ac[prev_t]) if prev_t >= 0 else final
            b = 1 - a
            if self.pred == "epsilon":
                x0 = (x - f(b**0.5) * eps) / f(a**0.5)
                e = eps
            else:
                x0 = f(a**0.5) * x - f(b**0.5) * eps
                e = f(a**0.5) * eps + f(b**0.5) * x
            return f(ap**0.5) * x0 + f((1 - ap) ** 0.5) * e
        # DPM-Solver++(2M), midpoint, lower_order_final, final sigma 0.
        def at_st(sig):
            a = 1.0 / (sig * sig + 1) ** 0.5
            return a, sig * a

        s = float(self.sigmas[i])
        a_s, s_s = at_st(s)
        x0 = (x - f(s_s) * eps) / f(a_s) if self.pred == "epsilon" else f(a_s) * x - f(s_s) * eps
        self.outputs = (self.outputs + [x0])[-2:]
        st = float(self.sigmas[i + 1])
        a_t, s_t = at_st(st)
        lam = lambda a, sg: (math.log(a) - math.log(sg)) if sg > 0 else math.inf
        lam_t, lam_s0 = lam(a_t, s_t), lam(a_s, s_s)
        h = lam_t - lam_s0
        first = len(self.outputs) < 2 or i == len(self.ts) - 1
        if first:
            return f(s_t / s_s) * x - f(a_t * (math.exp(-h) - 1.0)) * x0
        s1 = float(self.sigmas[i - 1])
        a_1, s_1 = at_st(s1)
        h0 = lam_s0 - lam(a_1, s_1)
        r0 = h0 / h
        m0, m1 = self.outputs[-1], self.outputs[-2]
        d1 = f(1.0 / r0) * (m0 - m1)
        c = f(a_t * (math.exp(-h) - 1.0))
        return f(s_t / s_s) * x - c * m0 - f(0.5) * c * d1


# ---------------------------------------------------------------- pipeline
def np_type(ort_type):
    return {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(int32)": np.int32}[ort_type]


# ---------------------------------------------------------------- LoRA merge
def load_safetensors(path):
    data = open(path, "rb").read()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        dt = {"F32": "<f4", "F16": "<f2"}[info["dtype"]]
        out[name] = np.frombuffer(data[8 + n + a : 8 + n + b], dtype=dt).reshape(info["shape"]).astype(np.float32)
    return out


def lora_modules(path):
    """{(component, module with '_' for '.'): {"up", "down", "alpha"}} of a kohya or PEFT file."""
    mods = {}
    for name, arr in load_safetensors(path).items():
        if name.startswith("lora_unet_") or name.startswith("lora_te_"):
            comp = "unet" if name.startswith("lora_unet_") else "text_encoder"
            module, part = name[len("lora_unet_" if comp == "unet" else "lora_te_") :].split(".", 1)
            part = {"lora_up.weight": "up", "lora_down.weight": "down", "alpha": "alpha"}[part]
        else:
            comp, rest = name.split(".", 1)
            for suffix, part in ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".alpha", "alpha")):
                if rest.endswith(suffix):
                    module = rest[: -len(suffix)].replace(".", "_")
                    break
            else:
                raise ValueError(f"{path}: unknown key {name}")
        mods.setdefault((comp, module), {})[part] = arr
    return mods


def merged_model(d, component, loras):
    """The component's ONNX model with the LoRAs merged into its initializers."""
    model = onnx.load(os.path.join(d, component, "model.onnx"))
    nm = json.load(open(os.path.join(d, component, "name_map.json")))["weights"]
    by_key = {p[: -len(".weight")].replace(".", "_"): e for p, e in nm.items() if p.endswith(".weight")}
    inits = {t.name: t for t in model.graph.initializer}
    deltas = {}
    for path, weight in loras:
        for (comp, key), m in lora_modules(path).items():
            if comp != component:
                continue
            e = by_key[key]
            w = numpy_helper.to_array(inits[e["onnx"]])
            perm = e.get("perm", list(range(w.ndim)))
            torch_shape = [0] * w.ndim
            for i, p in enumerate(perm):
                torch_shape[p] = w.shape[i]
            rank = m["down"].shape[0]
            scale = float(m["alpha"]) / rank if "alpha" in m else 1.0
            up = m["up"].reshape(m["up"].shape[0], rank).astype(np.float64)
            down = m["down"].reshape(rank, -1).astype(np.float64)
            # float64, rounded once: the same merged weights whatever the summation order.
            delta = (float(np.float32(weight)) * scale * (up @ down)).reshape(torch_shape).transpose(perm)
            deltas[e["onnx"]] = deltas.get(e["onnx"], 0) + delta
    for name, delta in deltas.items():
        w = numpy_helper.to_array(inits[name])
        merged = (w.astype(np.float64) + delta).astype(np.float32).astype(w.dtype)
        inits[name].CopyFrom(numpy_helper.from_array(merged, name))
    declared = {i.name for i in model.graph.input}
    for e in by_key.values():
        t = inits[e["onnx"]]
        if len(t.dims) in (2, 4) and t.name not in declared:
            declared.add(t.name)
            model.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return model.SerializeToString()


class Reference:
    """SD 1.x/2.x, or SDXL when the export has text_encoder_2 (diffusers' StableDiffusionXLPipeline:
    penultimate hidden states of both encoders concatenated, the second one's text_embeds pooled,
    time_ids = (h, w, 0, 0, h, w), zeros for an empty negative prompt)."""

    def __init__(self, d, loras=()):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3
        self.xl = os.path.isdir(os.path.join(d, "text_encoder_2"))

        def mk(p):
            src = merged_model(d, p, loras) if loras and p not in ("vae_decoder", "vae_encoder") else os.path.join(d, p, "model.onnx")
            return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
        self.te, self.unet, self.vae = mk("text_encoder"), mk("unet"), mk("vae_decoder")
        self.enc = mk("vae_encoder") if os.path.exists(os.path.join(d, "vae_encoder", "model.onnx")) else None
        self.tok = ClipTokenizer(os.path.join(d, "tokenizer"))
        if self.xl:
            self.te2 = mk("text_encoder_2")
            self.tok2 = ClipTokenizer(os.path.join(d, "tokenizer_2"))
        self.cfg = json.load(open(os.path.join(d, "scheduler", "scheduler_config.json")))
        self.scaling = json.load(open(os.path.join(d, "vae_decoder", "config.json"))).get("scaling_factor", 0.18215)

    @staticmethod
    def _run_te(te, ids, xl):
        inp = te.get_inputs()[0]
        names = [o.name for o in te.get_outputs()]
        outs = dict(zip(names, te.run(None, {inp.name: ids.astype(np_type(inp.type))})))
        if not xl:
            return outs["last_hidden_state"].astype(np.float32), None
        top = max(int(n.split(".")[1]) for n in names if n.startswith("hidden_states."))
        return outs[f"hidden_states.{top - 1}"].astype(np.float32), outs.get("text_embeds")

    def encode(self, prompt, negative):
        """(ids, hidden states [negative, prompt], pooled [negative, prompt] or None)."""
        ids = np.array([self.tok.encode(negative), self.tok.encode(prompt)], dtype=np.int64)
        h1, _ = self._run_te(self.te, ids, self.xl)
        if not self.xl:
            return ids, h1, None
        ids2 = np.array([self.tok2.encode(negative), self.tok2.encode(prompt)], dtype=np.int64)
        h2, pooled = self._run_te(self.te2, ids2, True)
        emb = np.concatenate([h1, h2], axis=-1)
        pooled = pooled.astype(np.float32)
        if negative == "":
            emb[0] = 0
            pooled[0] = 0
        return ids, emb, pooled

    def encode_image(self, rgb, seeds):
        """img2img: the image's latents, sampled from the encoder's distribution."""
        x = (rgb.astype(np.float32) / np.float32(255)) * np.float32(2) - np.float32(1)
        x = x.transpose(2, 0, 1)[None]
        inp = self.enc.get_inputs()[0]
        params = self.enc.run(None, {inp.name: x.astype(np_type(inp.type))})[0].astype(np.float32)
        c = params.shape[1] // 2
        mean, logvar = params[0, :c], np.clip(params[0, c:], -30.0, 20.0)
        std = np.exp(0.5 * logvar.astype(np.float64)).astype(np.float32)
        out = []
        for s in seeds:
            z = NoiseRng((s ^ VAE_ENCODE_STREAM_KEY) & MASK64).normals(mean.size).reshape(mean.shape)
            out.append((mean + std * z) * np.float32(self.scaling))
        return np.stack(out).astype(np.float32)

    def denoise(self, emb, noise, name, steps, guidance, seeds, pooled=None, size=None, init=None, strength=1.0):
        n = noise.shape[0]
        s = Sampler(self.cfg, name, steps, seeds, noise.shape[1:])
        start = 0
        if init is None:
            x = (noise * np.float32(s.init_sigma)).astype(np.float32)
        else:
            # diffusers' img2img: init_timestep = min(int(steps * strength), steps)
            start = steps - min(int(steps * strength), steps)
            x = s.add_noise(init, noise, start).astype(np.float32)
        ins = {i.name: i for i in self.unet.get_inputs()}
        sample_t = np_type(ins["sample"].type)
        ts_in = ins["timestep"]
        ehs = np.concatenate([np.repeat(emb[:1], n, 0), np.repeat(emb[1:], n, 0)]).astype(np_type(ins["encoder_hidden_states"].type))
        extra = {}
        if pooled is not None:
            extra["text_embeds"] = np.concatenate([np.repeat(pooled[:1], n, 0), np.repeat(pooled[1:], n, 0)]).astype(np_type(ins["text_embeds"].type))
            h, w = size
            extra["time_ids"] = np.tile(np.array([[h, w, 0, 0, h, w]], np.float32), (2 * n, 1)).astype(np_type(ins["time_ids"].type))
        for i in range(start, len(s.ts)):
            t = s.ts[i]
            xin = s.scale_input(x, i)
            xin = np.concatenate([xin, xin]).astype(sample_t)
            tt = np_type(ts_in.type)
            tval = np.array(t).astype(tt)
            tarr = np.full([2 * n], tval, dtype=tt) if len(ts_in.shape) == 1 else tval
            out = self.unet.run(["out_sample"], {"sample": xin, "timestep": tarr, "encoder_hidden_states": ehs, **extra})[0].astype(np.float32)
            unc, cond = out[:n], out[n:]
            eps = unc + np.float32(guidance) * (cond - unc)
            x = s.step(eps, i, x).astype(np.float32)
        return x

    def decode(self, x):
        inp = self.vae.get_inputs()[0]
        z = (x / np.float32(self.scaling)).astype(np_type(inp.type))
        return self.vae.run(["sample"], {inp.name: z})[0].astype(np.float32)


SCHEDULERS = ["euler", "euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_karras"]
LORA_SETS = {
    "lora_a": [["tiny-a.kohya.safetensors", 0.8]],
    "lora_ab": [["tiny-a.kohya.safetensors", 0.8], ["tiny-b.kohya.safetensors", -0.7]],
}
REQUEST = dict(prompt="a photo of an astronaut riding a horse on mars", negative_prompt="ugly, blurry", width=48, height=64, steps=8, guidance_scale=7.5, seed=42, num_images=2)


def write_golden(root, fixture):
    ref = Reference(os.path.join(root, fixture))
    out = os.path.join(root, "golden", fixture)
    os.makedirs(out, exist_ok=True)
    r = REQUEST
    ids, emb, _ = ref.encode(r["prompt"], r["negative_prompt"])
    shape = (4, r["height"] // 8, r["width"] // 8)
    noise = initial_noise(r["seed"], r["num_images"], shape)
    noise.astype("<f4").tofile(os.path.join(out, "noise.f32"))
    seeds = [r["seed"] + i for i in range(r["num_images"])]
    for name in SCHEDULERS:
        x = ref.denoise(emb, noise, name, r["steps"], r["guidance_scale"], seeds)
        x.astype("<f4").tofile(os.path.join(out, f"{name}.latents.f32"))
        print(fixture, name, "latents mean abs", float(np.abs(x).mean()))
        if name == "euler":
            ref.decode(x).astype("<f4").tofile(os.path.join(out, "euler.image.f32"))
    for set_name, loras in LORA_SETS.items():
        lref = Reference(os.path.join(root, fixture), [(os.path.join(root, "loras", f), w) for f, w in loras])
        _, lemb, _ = lref.encode(r["prompt"], r["negative_prompt"])
        for name in SCHEDULERS:
            x = lref.denoise(lemb, noise, name, r["steps"], r["guidance_scale"], seeds)
            x.astype("<f4").tofile(os.path.join(out, f"{set_name}.{name}.latents.f32"))
        print(fixture, set_name, "done")
    meta = dict(REQUEST)
    if fixture == "tiny-sd":
        write_img2img(ref, out, REQUEST, emb, None, meta)
    meta.update({"uncond_ids": ids[0].tolist(), "cond_ids": ids[1].tolist(), "schedulers": SCHEDULERS, "lora_sets": LORA_SETS})
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f)


IMG2IMG = dict(init_image="images/init-48x64.png", strength=0.6)


def read_png_rgb(path):
    """8-bit RGB PNG without filters other than those zlib+PNG allow (fixtures/images)."""
    import struct
    import zlib

    data = open(path, "rb").read()
    pos, idat, w, h = 8, b"", 0, 0
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + n]
        if kind == b"IHDR":
            w, h = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = zlib.decompress(idat)
    rows = [raw[y * (3 * w + 1) : (y + 1) * (3 * w + 1)] for y in range(h)]
    assert all(r[0] == 0 for r in rows), "only filter type 0 is read here"
    return np.frombuffer(b"".join(r[1:] for r in rows), np.uint8).reshape(h, w, 3)


def write_img2img(ref, out, r, emb, pooled, meta):
    rgb = read_png_rgb(os.path.join("fixtures", IMG2IMG["init_image"]))
    seeds = [r["seed"] + i for i in range(r["num_images"])]
    init = ref.encode_image(rgb, seeds)
    noise = initial_noise(r["seed"], r["num_images"], init.shape[1:])
    for name in SCHEDULERS:
        x = ref.denoise(emb, noise, name, r["steps"], r["guidance_scale"], seeds, pooled=pooled, size=(r["height"], r["width"]), init=init, strength=IMG2IMG["strength"])
        x.astype("<f4").tofile(os.path.join(out, f"img2img.{name}.latents.f32"))
    meta["img2img"] = IMG2IMG


XL_REQUEST = dict(prompt="a photo of an astronaut riding a horse on mars", negative_prompt="ugly, blurry", width=48, height=64, steps=8, guidance_scale=7.5, seed=7, num_images=2)


def write_golden_xl(root, fixture):
    ref = Reference(os.path.join(root, fixture))
    out = os.path.join(root, "golden", fixture)
    os.makedirs(out, exist_ok=True)
    r = XL_REQUEST
    size = (r["height"], r["width"])
    ids, emb, pooled = ref.encode(r["prompt"], r["negative_prompt"])
    shape = (4, r["height"] // 8, r["width"] // 8)
    noise = initial_noise(r["seed"], r["num_images"], shape)
    noise.astype("<f4").tofile(os.path.join(out, "noise.f32"))
    seeds = [r["seed"] + i for i in range(r["num_images"])]
    for name in SCHEDULERS:
        x = ref.denoise(emb, noise, name, r["steps"], r["guidance_scale"], seeds, pooled=pooled, size=size)
        x.astype("<f4").tofile(os.path.join(out, f"{name}.latents.f32"))
        print(fixture, name, "latents mean abs", float(np.abs(x).mean()))
        if name == "euler":
            ref.decode(x).astype("<f4").tofile(os.path.join(out, "euler.image.f32"))
    _, emb0, pooled0 = ref.encode(r["prompt"], "")
    x = ref.denoise(emb0, noise, "euler", r["steps"], r["guidance_scale"], seeds, pooled=pooled0, size=size)
    x.astype("<f4").tofile(os.path.join(out, "no-negative.euler.latents.f32"))
    meta = dict(r)
    write_img2img(ref, out, r, emb, pooled, meta)
    meta.update({"schedulers": SCHEDULERS})
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f)


def write_golden_upscaler(root):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    s = ort.InferenceSession(os.path.join(root, "upscaler-x2", "model.onnx"), opts, providers=["CPUExecutionProvider"])
    # The top-left 24x32 of the test picture (a smaller golden file).
    rgb = read_png_rgb(os.path.join(root, "images", "init-48x64.png"))[:32, :24]
    x = (rgb.astype(np.float32) / np.float32(255)).transpose(2, 0, 1)[None]
    y = s.run(None, {"input": x})[0]
    out = os.path.join(root, "golden", "upscaler-x2")
    os.makedirs(out, exist_ok=True)
    y.astype("<f4").tofile(os.path.join(out, "crop-24x32.x2.f32"))
    print("upscaler", y.shape)


def print_schedules():
    sd15 = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1, "set_alpha_to_one": False}
    np.set_printoptions(precision=9, floatmode="unique", linewidth=200)
    for name in SCHEDULERS:
        for sp in (None, "leading", "trailing", "linspace"):
            cfg = dict(sd15)
            if sp:
                cfg["timestep_spacing"] = sp
            ts, sig, init = schedule(cfg, name, 10)
            print(name, sp or "default", "timesteps", list(ts), "init", init)
            if sig is not None:
                print("   sigmas", [float(v) for v in sig])


if __name__ == "__main__":
    if "--print-schedules" in sys.argv:
        print_schedules()
        sys.exit(0)
    root = "fixtures"
    for fx in ("tiny-sd", "tiny-sd-fp16"):
        write_golden(root, fx)
    write_golden_xl(root, "tiny-sdxl")
    write_golden_upscaler(root)
