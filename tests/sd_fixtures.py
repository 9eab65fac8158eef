"""Stable Diffusion checkpoints with random weights, in the layouts users have, made by the
reference libraries (no model hub): shared by tests/test_convert.py and benchmarks/convert_load.py.

* ``build_models(spec)``: diffusers' UNet2DConditionModel and AutoencoderKL, transformers'
  CLIPTextModel, with every constant-initialised tensor (norm scales, biases) perturbed.
* ``save_diffusers_folder``: ``StableDiffusionPipeline.save_pretrained`` (safetensors or legacy .bin).
* ``ldm_state_dict``: the same weights renamed into the original CompVis (ldm) single-file layout,
  by a diffusers -> ldm map written here, independently of minidiff's ldm -> diffusers map, plus
  the buffers ldm's DDPM saves (the noise schedule, EMA bookkeeping, text position ids).  The test
  checks this layout with diffusers' own single-file loader.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# Reduced widths with SD's block structure.  Head counts follow each family's rule (SD 1.x: 8
# heads per UNet block; SD 2.x: heads of width 64; CLIP text: heads of width 64), because a single
# file does not store them.  The text encoder's vocabulary is cut to 1000 to keep the files small.
SD1_SMALL = dict(
    family="sd1",
    unet=dict(block_out_channels=(32, 64, 64, 64), attention_head_dim=8, cross_attention_dim=768),
    vae=dict(block_out_channels=(32, 32, 64, 64)),
    text=dict(vocab_size=1000, bos_token_id=0, eos_token_id=2, hidden_size=768, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=12,
              hidden_act="quick_gelu"),
)
SD2_SMALL = dict(
    family="sd2", sample_size=768,  # a 768-px v-prediction model, as SD 2.1
    unet=dict(block_out_channels=(64, 128, 128, 128), attention_head_dim=(1, 2, 2, 2), cross_attention_dim=1024,
              use_linear_projection=True),
    vae=dict(block_out_channels=(32, 32, 64, 64)),
    # the OpenCLIP tower: 3 blocks in the single file; SD 2.x conditions on the penultimate one, so
    # the diffusers folder (like the public SD 2 folders) holds the first 2
    text=dict(vocab_size=1000, bos_token_id=0, eos_token_id=2, hidden_size=1024, intermediate_size=1024, num_hidden_layers=3, num_attention_heads=16,
              hidden_act="gelu"),
)
SD15 = dict(  # the public SD 1.5 architecture
    family="sd1",
    unet=dict(block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768),
    vae=dict(block_out_channels=(128, 256, 512, 512)),
    text=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu"),
)


def build_models(spec, seed=0, perturb=True):
    """(unet, vae, text_encoder): random reference models (eval mode, float32)."""
    import diffusers
    import torch
    import transformers

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=spec.get("sample_size", 512) // 8, in_channels=4, out_channels=4, layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, **spec["unet"]).eval()
    n = len(spec["vae"]["block_out_channels"])
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                                  down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                                  sample_size=spec.get("sample_size", 512), **spec["vae"]).eval()
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(max_position_embeddings=77, **spec["text"])).eval()
    if perturb:
        with torch.no_grad():
            for model in (unet, vae, text):
                for p in model.parameters():  # norm scales (ones) and biases (zeros): make them random
                    if p.numel() > 1 and bool(torch.all(p == p.flatten()[0])):
                        p.add_(0.1 * torch.randn_like(p))
    return unet, vae, text


# --- a diffusers folder --------------------------------------------------------------------------

def write_tokenizer(folder: Path, pad_token: str):
    """vocab.json + merges.txt (CLIP's vocabulary, from the copy bundled with minidiff) and the
    special-token configs, as transformers writes them."""
    from minidiff.tokenizer import CLIPTokenizer

    tok = CLIPTokenizer.from_bpe_gz()
    merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.get)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(tok.encoder, ensure_ascii=False), "utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", "utf-8")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials), "utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({**specials, "model_max_length": 77}), "utf-8")


def save_diffusers_folder(folder, unet, vae, text, family, safe_serialization=True):
    """``StableDiffusionPipeline.save_pretrained``: unet/ vae/ text_encoder/ tokenizer/ scheduler/.
    SD 2.x's text_encoder/ keeps all but the last layer (as the public SD 2 folders do)."""
    import copy

    import diffusers
    import transformers

    folder = Path(folder)
    write_tokenizer(folder / "_tok", "!" if family == "sd2" else "<|endoftext|>")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder / "_tok")
    if family == "sd2":  # the penultimate-layer encoder
        text = copy.deepcopy(text)
        text.config.num_hidden_layers -= 1
        layers = text.text_model.encoder.layers if hasattr(text, "text_model") else text.encoder.layers
        del layers[-1]
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                        prediction_type="v_prediction" if family == "sd2" else "epsilon")
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=safe_serialization)
    # transformers 5 writes tokenizer.json; the public SD folders hold vocab.json + merges.txt
    for f in (folder / "_tok").iterdir():
        f.replace(folder / "tokenizer" / f.name)
    (folder / "_tok").rmdir()
    return folder


# --- the ldm single-file layout (diffusers -> ldm, written independently of minidiff) --------------

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def ldm_unet_name(name, layers_per_block, attention):
    """A diffusers UNet name -> ldm (openaimodel.UNetModel) name."""
    L = layers_per_block
    parts = name.split(".")
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}  # SDXL
    head = ".".join(parts[:-1])
    if head in fixed:
        return f"{fixed[head]}.{parts[-1]}"
    if parts[0] == "down_blocks":
        i = int(parts[1])
        if parts[2] == "downsamplers":  # down_blocks.i.downsamplers.0.conv.w
            return f"input_blocks.{(i + 1) * (L + 1)}.0.op.{parts[-1]}"
        j = int(parts[3])
        k = 1 + i * (L + 1) + j
        if parts[2] == "resnets":
            return f"input_blocks.{k}.0.{_RESNET[parts[4]]}.{parts[-1]}"
        return f"input_blocks.{k}.1.{'.'.join(parts[4:])}"
    if parts[0] == "mid_block":
        j = int(parts[2])
        if parts[1] == "resnets":
            return f"middle_block.{2 * j}.{_RESNET[parts[3]]}.{parts[-1]}"
        return f"middle_block.1.{'.'.join(parts[3:])}"
    if parts[0] == "up_blocks":
        i = int(parts[1])
        if parts[2] == "upsamplers":
            has_attention = attention[len(attention) - 1 - i]
            return f"output_blocks.{i * (L + 1) + L}.{2 if has_attention else 1}.conv.{parts[-1]}"
        k = i * (L + 1) + int(parts[3])
        if parts[2] == "resnets":
            return f"output_blocks.{k}.0.{_RESNET[parts[4]]}.{parts[-1]}"
        return f"output_blocks.{k}.1.{'.'.join(parts[4:])}"
    raise KeyError(name)


def ldm_vae_name(name, num_blocks):
    """A diffusers AutoencoderKL name -> ldm (AutoencoderKL with Encoder/Decoder) name."""
    p = name.split(".")
    leaf = p[-1]
    if p[1] in ("conv_in", "conv_out") or p[0] in ("quant_conv", "post_quant_conv"):
        return name
    if p[1] == "conv_norm_out":
        return f"{p[0]}.norm_out.{leaf}"
    if p[1] == "mid_block":
        if p[2] == "resnets":
            return f"{p[0]}.mid.block_{int(p[3]) + 1}.{p[4].replace('conv_shortcut', 'nin_shortcut')}.{leaf}"
        attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}[p[4]]
        return f"{p[0]}.mid.attn_1.{attn}.{leaf}"
    if p[1] == "down_blocks":
        if p[3] == "downsamplers":
            return f"encoder.down.{p[2]}.downsample.conv.{leaf}"
        return f"encoder.down.{p[2]}.block.{p[4]}.{p[5].replace('conv_shortcut', 'nin_shortcut')}.{leaf}"
    if p[1] == "up_blocks":
        b = num_blocks - 1 - int(p[2])
        if p[3] == "upsamplers":
            return f"decoder.up.{b}.upsample.conv.{leaf}"
        return f"decoder.up.{b}.block.{p[4]}.{p[5].replace('conv_shortcut', 'nin_shortcut')}.{leaf}"
    raise KeyError(name)


def openclip_state_dict(text_sd, num_layers, rng):
    """transformers CLIP text names -> OpenCLIP's (SD 2.x: cond_stage_model.model.*), q/k/v fused."""
    import torch

    sd = {k.removeprefix("text_model."): v for k, v in text_sd.items()}
    out = {"token_embedding.weight": sd["embeddings.token_embedding.weight"],
           "positional_embedding": sd["embeddings.position_embedding.weight"],
           "ln_final.weight": sd["final_layer_norm.weight"], "ln_final.bias": sd["final_layer_norm.bias"]}
    for n in range(num_layers):
        a = f"encoder.layers.{n}."
        b = f"transformer.resblocks.{n}."
        for leaf in ("weight", "bias"):
            out[f"{b}attn.in_proj_{leaf}"] = torch.cat([sd[f"{a}self_attn.{q}_proj.{leaf}"] for q in "qkv"])
            out[f"{b}attn.out_proj.{leaf}"] = sd[f"{a}self_attn.out_proj.{leaf}"]
            out[f"{b}ln_1.{leaf}"] = sd[f"{a}layer_norm1.{leaf}"]
            out[f"{b}ln_2.{leaf}"] = sd[f"{a}layer_norm2.{leaf}"]
            out[f"{b}mlp.c_fc.{leaf}"] = sd[f"{a}mlp.fc1.{leaf}"]
            out[f"{b}mlp.c_proj.{leaf}"] = sd[f"{a}mlp.fc2.{leaf}"]
    width = out["ln_final.weight"].shape[0]
    out["text_projection"] = torch.from_numpy(rng.standard_normal((width, width)).astype(np.float32))
    out["logit_scale"] = torch.tensor(4.6052)
    return out


def ldm_schedule(betas):
    """ldm's DDPM.register_schedule, in float64 NumPy, stored as float32 (as ldm does)."""
    alphas = 1.0 - betas
    ab = np.cumprod(alphas)
    ab_prev = np.append(1.0, ab[:-1])
    post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
    buffers = {
        "betas": betas, "alphas_cumprod": ab, "alphas_cumprod_prev": ab_prev,
        "sqrt_alphas_cumprod": np.sqrt(ab), "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ab),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ab), "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ab),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ab - 1), "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(ab_prev) / (1.0 - ab),
        "posterior_mean_coef2": (1.0 - ab_prev) * np.sqrt(alphas) / (1.0 - ab),
    }
    return {k: v.astype(np.float32) for k, v in buffers.items()}


def sd_betas(schedule="scaled_linear"):
    if schedule == "scaled_linear":  # ldm calls this one "linear"
        return np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return np.linspace(1e-4, 0.02, 1000, dtype=np.float64)  # DDPM's linear


def ldm_state_dict(unet, vae, text, family, seed=0, text_model_level=True, ema=None, schedule="scaled_linear"):
    """The three models in one ldm-layout state dict of torch tensors (sharing the models' storage).

    ``ema``: None, or a UNet whose weights become the EMA copy (``model_ema.`` + the ldm name
    without dots, as ldm's LitEma names them); ``text_model_level``: SD 1.x text keys with the
    ``text_model.`` level (the public files) or without it."""
    import torch

    rng = np.random.default_rng(seed)
    cfg = unet.config
    attention = [t.startswith("CrossAttn") for t in cfg.down_block_types]
    sd = {"model.diffusion_model." + ldm_unet_name(k, cfg.layers_per_block, attention): v
          for k, v in unet.state_dict().items()}
    if ema is not None:
        for k, v in ema.state_dict().items():
            name = "diffusion_model." + ldm_unet_name(k, cfg.layers_per_block, attention)
            sd["model_ema." + name.replace(".", "")] = v
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(1234, dtype=torch.int32)
    n = len(vae.config.block_out_channels)
    for k, v in vae.state_dict().items():
        name = ldm_vae_name(k, n)
        if ".mid.attn_1." in name and v.ndim == 2:  # ldm's AttnBlock: 1x1 convs
            v = v[:, :, None, None]
        sd["first_stage_model." + name] = v
    text_sd = {k.removeprefix("text_model."): v for k, v in text.state_dict().items()}
    if family == "sd1":
        prefix = "cond_stage_model.transformer." + ("text_model." if text_model_level else "")
        sd.update({prefix + k: v for k, v in text_sd.items()})
        sd[prefix + "embeddings.position_ids"] = torch.arange(77)[None]
    else:
        sd.update({"cond_stage_model.model." + k: v
                   for k, v in openclip_state_dict(text_sd, text.config.num_hidden_layers, rng).items()})
    for k, v in ldm_schedule(sd_betas(schedule)).items():
        sd[k] = torch.from_numpy(v)
    return sd


def save_ldm(sd, path, dtype=None):
    """A single file: ``.safetensors`` (safetensors.torch) or ``.ckpt`` (torch.save of
    {"state_dict": ..., "global_step": ...}, as Lightning saved it).  ``dtype``: cast floats first."""
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({"state_dict": sd, "global_step": 470000, "epoch": 3}, path)
    return path


# --- SDXL: two text encoders, the added "text_time" embedding, the SGM single-file layout ----------

# SDXL's block structure (no attention in the first block, transformer depth per block, linear
# proj_in/out, heads of width 64) at reduced widths; the text encoders keep CLIP's vocabulary so that
# the real tokenizer can drive the whole pipeline.  Context = 128 (CLIP-L's width) + 192 (bigG's).
SDXL_SMALL = dict(
    family="sdxl", sample_size=256,
    unet=dict(block_out_channels=(64, 128, 128), attention_head_dim=(1, 2, 2), transformer_layers_per_block=(1, 2, 3),
              cross_attention_dim=320, addition_time_embed_dim=256, projection_class_embeddings_input_dim=192 + 6 * 256),
    vae=dict(block_out_channels=(32, 32, 64, 64), scaling_factor=0.13025, force_upcast=True),
    text=dict(vocab_size=49408, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
              hidden_act="quick_gelu"),
    text_2=dict(vocab_size=49408, hidden_size=192, intermediate_size=384, num_hidden_layers=3, num_attention_heads=3,
                hidden_act="gelu", projection_dim=192),
)
SDXL = dict(  # the public SDXL base 1.0 architecture
    family="sdxl", sample_size=1024,
    unet=dict(block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
              cross_attention_dim=2048, addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
    vae=dict(block_out_channels=(128, 256, 512, 512), scaling_factor=0.13025, force_upcast=True),
    text=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu"),
    text_2=dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                hidden_act="gelu", projection_dim=1280),
)


def _perturb(models):
    import torch

    with torch.no_grad():
        for model in models:
            for p in model.parameters():  # norm scales (ones) and biases (zeros): make them random
                if p.numel() > 1 and bool(torch.all(p == p.flatten()[0])):
                    p.add_(0.1 * torch.randn_like(p))


def build_sdxl_models(spec=SDXL_SMALL, seed=0, perturb=True):
    """(unet, vae, text_encoder, text_encoder_2): random reference SDXL models (eval mode, float32):
    diffusers' UNet2DConditionModel with the "text_time" added embedding, AutoencoderKL, transformers'
    CLIPTextModel and CLIPTextModelWithProjection."""
    import diffusers
    import torch
    import transformers

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=spec["sample_size"] // 8, in_channels=4, out_channels=4, layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
        addition_embed_type="text_time", addition_embed_type_num_heads=64, **spec["unet"]).eval()
    n = len(spec["vae"]["block_out_channels"])
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                                  down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                                  sample_size=spec["sample_size"], **spec["vae"]).eval()
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(max_position_embeddings=77, **spec["text"])).eval()
    text_2 = transformers.CLIPTextModelWithProjection(
        transformers.CLIPTextConfig(max_position_embeddings=77, **spec["text_2"])).eval()
    if perturb:
        _perturb((unet, vae, text, text_2))
    return unet, vae, text, text_2


def sdxl_scheduler():
    """The scheduler_config.json of SDXL base 1.0: Euler, leading spacing, steps_offset 1."""
    import diffusers

    return diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
                                            use_karras_sigmas=False, prediction_type="epsilon")


def sdxl_pipeline(unet, vae, text, text_2, folder):
    """diffusers' StableDiffusionXLPipeline of these models (tokenizers written under ``folder``)."""
    import diffusers
    import transformers

    folder = Path(folder)
    write_tokenizer(folder / "_tok", "<|endoftext|>")
    write_tokenizer(folder / "_tok2", "!")  # bigG's tokenizer pads with "!" (id 0)
    tok, tok_2 = (transformers.CLIPTokenizer.from_pretrained(folder / name) for name in ("_tok", "_tok2"))
    return diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tok,
                                               tokenizer_2=tok_2, unet=unet, scheduler=sdxl_scheduler(),
                                               force_zeros_for_empty_prompt=True, add_watermarker=False)


def save_sdxl_folder(folder, unet, vae, text, text_2, safe_serialization=True):
    """``StableDiffusionXLPipeline.save_pretrained``: unet/ vae/ text_encoder/ text_encoder_2/ tokenizer/
    tokenizer_2/ scheduler/ (the tokenizers as vocab.json + merges.txt, as the public folder has them)."""
    folder = Path(folder)
    pipe = sdxl_pipeline(unet, vae, text, text_2, folder)
    pipe.save_pretrained(folder, safe_serialization=safe_serialization)
    for tok, name in (("_tok", "tokenizer"), ("_tok2", "tokenizer_2")):
        for f in (folder / tok).iterdir():
            f.replace(folder / name / f.name)
        (folder / tok).rmdir()
    return folder


def sgm_state_dict(unet, vae, text, text_2):
    """The four models in the single-file layout of sd_xl_base_1.0.safetensors (Stability's SGM code):
    model.diffusion_model.* (ldm names, the added embedding as label_emb.0.0 / .0.2),
    first_stage_model.*, conditioner.embedders.0.transformer.text_model.* (CLIP-L in transformers'
    names), conditioner.embedders.1.model.* (bigG in open_clip's names: fused in_proj, text_projection
    stored (width, proj) = transformers' weight transposed, logit_scale)."""
    import torch

    cfg = unet.config
    attention = [t.startswith("CrossAttn") for t in cfg.down_block_types]
    sd = {"model.diffusion_model." + ldm_unet_name(k, cfg.layers_per_block, attention): v
          for k, v in unet.state_dict().items()}
    n = len(vae.config.block_out_channels)
    for k, v in vae.state_dict().items():
        name = ldm_vae_name(k, n)
        if ".mid.attn_1." in name and v.ndim == 2:  # 1x1 convs
            v = v[:, :, None, None]
        sd["first_stage_model." + name] = v
    prefix = "conditioner.embedders.0.transformer.text_model."
    sd.update({prefix + k.removeprefix("text_model."): v for k, v in text.state_dict().items()})
    sd[prefix + "embeddings.position_ids"] = torch.arange(77)[None]
    g = {k.removeprefix("text_model."): v for k, v in text_2.state_dict().items()}
    open_clip = openclip_state_dict(g, text_2.config.num_hidden_layers, np.random.default_rng(0))
    open_clip["text_projection"] = g["text_projection.weight"].T.contiguous()  # (width, proj)
    sd.update({"conditioner.embedders.1.model." + k: v for k, v in open_clip.items()})
    return sd
