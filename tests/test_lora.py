"""LoRA files (minidiff.lora): W' = W + scale * (alpha / rank) * up @ down, fused into the Flax tree.

* by hand, without torch: the formula and the Flax layouts (Dense (in, out), Conv (kh, kw, in, out)),
  several LoRAs, the base weights back bit for bit, and the errors (one ValueError listing them all);
* parity: random LoRA files written here, in both formats (diffusers / PEFT and kohya, the kohya one
  with diffusers and with ldm module paths), on every kind of layer (attention q/k/v/out, feed-forward,
  proj_in/out, ResNet conv1/conv2 as LoCon, text encoder q/k/v/out_proj and mlp) of the random SD 1.x
  and SD 2.x fixtures (tests/sd_fixtures.py): after minidiff fuses them, the UNet's and the text
  encoder's outputs equal those of diffusers' ``load_lora_weights`` + ``fuse_lora``;
* the pipeline (``load_lora`` / ``remove_loras``) and ``minidiff txt2img --lora FILE[:SCALE]``.
"""

import json

import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from safetensors.numpy import save_file

from minidiff.lora import fuse_loras, read_lora, restore


def _save(path, tensors, metadata=None):
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


# --- by hand ---------------------------------------------------------------------------------------

def _tree(rng):
    return {"unet": {"down_blocks_0": {"attentions_0": {"to_q": {"kernel": rng.standard_normal((6, 5)).astype(np.float32)}},
                                       "resnets_0": {"conv1": {"kernel": rng.standard_normal((3, 3, 4, 7)).astype(np.float32),
                                                               "bias": np.zeros(7, np.float32)}}}},
            "text_encoder": {"encoder": {"layers_0": {"mlp": {"fc1": {"kernel": rng.standard_normal((5, 8)).astype(np.float16)}}}}}}


def test_the_formula_in_the_flax_layouts_and_the_base_back_bit_for_bit(tmp_path):
    rng = np.random.default_rng(0)
    params = _tree(rng)
    q_down, q_up = rng.standard_normal((2, 6)), rng.standard_normal((5, 2))  # linear: (r, in), (out, r)
    c_down, c_up = rng.standard_normal((3, 4, 3, 3)), rng.standard_normal((7, 3, 1, 1))  # LoCon
    f_down, f_up = rng.standard_normal((2, 5)), rng.standard_normal((8, 2))
    kohya = _save(tmp_path / "k.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_to_q.lora_down.weight": q_down,
        "lora_unet_down_blocks_0_attentions_0_to_q.lora_up.weight": q_up,
        "lora_unet_down_blocks_0_attentions_0_to_q.alpha": np.array(1.0),
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": c_down,
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": c_up,  # no alpha: alpha = rank
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": f_down,
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": f_up,
        # a layer past the encoder's last (SD 2.x keeps 23 of OpenCLIP's 24 layers): skipped
        "lora_te_text_model_encoder_layers_1_mlp_fc1.lora_down.weight": f_down,
        "lora_te_text_model_encoder_layers_1_mlp_fc1.lora_up.weight": f_up})
    peft = _save(tmp_path / "p.safetensors", {
        "unet.down_blocks.0.attentions.0.to_q.lora_A.weight": q_down,
        "unet.down_blocks.0.attentions.0.to_q.lora_B.weight": q_up},
        {"lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": 4})})
    a, b = read_lora(kohya), read_lora(peft)
    assert (a.format, b.format) == ("kohya", "peft")
    fused, base = fuse_loras(params, [(a, 0.5), (b, -2.0)], layers_per_block=2)

    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    q = params["unet"]["down_blocks_0"]["attentions_0"]["to_q"]["kernel"]
    want_q = q + f32(0.5 * (1.0 / 2) * (q_up @ q_down).T) + f32(-2.0 * (4 / 2) * (q_up @ q_down).T)
    np.testing.assert_allclose(fused["unet"]["down_blocks_0"]["attentions_0"]["to_q"]["kernel"], want_q, rtol=1e-5, atol=1e-5)
    c = params["unet"]["down_blocks_0"]["resnets_0"]["conv1"]["kernel"]
    delta = np.einsum("or,rihw->oihw", c_up[:, :, 0, 0], c_down)  # torch OIHW -> Flax HWIO
    np.testing.assert_allclose(fused["unet"]["down_blocks_0"]["resnets_0"]["conv1"]["kernel"],
                               c + 0.5 * delta.transpose(2, 3, 1, 0), rtol=1e-5, atol=1e-5)
    f = params["text_encoder"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"]
    got_f = fused["text_encoder"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"]
    assert got_f.dtype == np.float16  # stored in the leaf's dtype
    np.testing.assert_allclose(got_f, f32(f) + 0.5 * (f_up @ f_down).T, rtol=2e-3, atol=2e-3)
    # untouched leaves are the same objects; the given tree is unchanged; restore gives the originals back
    assert fused["unet"]["down_blocks_0"]["resnets_0"]["conv1"]["bias"] is params["unet"]["down_blocks_0"]["resnets_0"]["conv1"]["bias"]
    assert params["unet"]["down_blocks_0"]["attentions_0"]["to_q"]["kernel"] is q
    back = restore(fused, base)
    for path, leaf in flatten_dict(params).items():
        assert flatten_dict(back)[path] is leaf, path


def test_bad_files_are_one_error_naming_the_file(tmp_path):
    rng = np.random.default_rng(1)
    params = _tree(rng)
    with pytest.raises(ValueError, match="LoRA file not found"):
        read_lora(tmp_path / "nope.safetensors")
    (tmp_path / "x.ckpt").write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="safetensors files only"):
        read_lora(tmp_path / "x.ckpt")
    (tmp_path / "notes.safetensors").write_text("not tensors\n" * 10)
    with pytest.raises(ValueError, match="not a readable .safetensors file"):
        read_lora(tmp_path / "notes.safetensors")
    _save(tmp_path / "model.safetensors", {"conv_in.weight": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="model.safetensors holds no LoRA layers"):
        read_lora(tmp_path / "model.safetensors")
    # SDXL-only names: nothing matches -> an error, not a silent no-op
    xl = _save(tmp_path / "xl.safetensors", {"lora_unet_input_blocks_4_1_transformer_blocks_9_attn1_to_q.lora_down.weight": np.ones((2, 6)),
                                              "lora_unet_input_blocks_4_1_transformer_blocks_9_attn1_to_q.lora_up.weight": np.ones((5, 2))})
    with pytest.raises(ValueError, match="xl.safetensors: none of its 1 LoRA layers matches"):
        fuse_loras(params, [(read_lora(xl), 1.0)], 2)
    # one error listing both an unknown key and a shape that does not fit
    bad = _save(tmp_path / "bad.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_to_q.lora_down.weight": np.ones((2, 6)),
        "lora_unet_down_blocks_0_attentions_0_to_q.lora_up.weight": np.ones((5, 2)),
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": np.ones((2, 9, 3, 3)),
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": np.ones((7, 2, 1, 1)),
        "lora_unet_mid_block_attentions_0_to_k.lora_down.weight": np.ones((2, 6)),
        "lora_unet_mid_block_attentions_0_to_k.lora_up.weight": np.ones((5, 2)),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": np.ones((2, 5))})  # no up
    with pytest.raises(ValueError) as e:
        fuse_loras(params, [(read_lora(bad), 1.0)], 2)
    msg = str(e.value)
    assert msg.startswith("bad.safetensors: cannot apply the LoRA") and "\n" not in msg
    assert "lora_unet_mid_block_attentions_0_to_k" in msg and "resnets_0_conv1" in msg and "(2, 2)" not in msg
    assert "no up factor" in msg and "do not fit" in msg


def test_ldm_module_paths_map_to_the_diffusers_layers():
    from minidiff.weights import ldm_unet_module_flat

    assert ldm_unet_module_flat("input_blocks_1_1_transformer_blocks_0_attn1_to_q", 2) == \
        "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert ldm_unet_module_flat("input_blocks_4_0_in_layers_2", 2) == "down_blocks_1_resnets_0_conv1"
    assert ldm_unet_module_flat("output_blocks_5_0_out_layers_3", 2) == "up_blocks_1_resnets_2_conv2"
    assert ldm_unet_module_flat("middle_block_1_proj_out", 2) == "mid_block_attentions_0_proj_out"
    assert ldm_unet_module_flat("output_blocks_11_1_transformer_blocks_0_ff_net_2", 2) == \
        "up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2"
    assert ldm_unet_module_flat("time_embed_0", 2) == "time_embedding_linear_1"
    assert ldm_unet_module_flat("nothing_here", 2) is None


# --- the pipeline and the command line (the built-in mini model) ------------------------------------

def _mini_lora(pipe, path, rng, kohya=False):
    """Random factors for every attention projection of the mini model's UNet and text encoder."""
    tensors = {}
    for part, tree in (("unet", pipe.params["unet"]), ("text_encoder", pipe.params["text_encoder"])):
        for p, w in flatten_dict(tree).items():
            if p[-1] == "kernel" and p[-2] in ("to_q", "to_v", "q_proj", "out_proj"):
                d_in, d_out = w.shape
                if kohya:
                    name = ("lora_unet_" if part == "unet" else "lora_te_text_model_") + "_".join(p[:-1])
                    down, up = f"{name}.lora_down.weight", f"{name}.lora_up.weight"
                else:
                    name = f"{part}." + ".".join(p[:-1])  # e.g. unet.down_blocks_0.attentions_0...: dots or "_" alike
                    down, up = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
                tensors[down] = rng.standard_normal((2, d_in)) / np.sqrt(d_in)
                tensors[up] = rng.standard_normal((d_out, 2))
    return _save(path, tensors)


def test_pipeline_load_lora_and_remove_loras(tmp_path):
    from minidiff.pipeline import load_pipeline

    pipe = load_pipeline()
    rng = np.random.default_rng(2)
    a = _mini_lora(pipe, tmp_path / "a.safetensors", rng, kohya=True)
    b = _mini_lora(pipe, tmp_path / "b.safetensors", rng)
    base = {k: v for k, v in flatten_dict(pipe.params).items()}
    kw = dict(steps=2, seed=3, sampler="ddim")
    plain = pipe("a red circle", **kw)  # places the weights on the device (replacing host leaves)
    placed = {k: v for k, v in flatten_dict(pipe.params).items()}
    text = pipe.load_lora(a, scale=0.8)
    assert text.startswith("a.safetensors (sha256 ") and "scale 0.8" in text and "kohya" in text
    pipe.load_lora(b, scale=0.5)
    assert [(d["file"], d["scale"]) for d in pipe.loras] == [("a.safetensors", 0.8), ("b.safetensors", 0.5)]
    changed = pipe("a red circle", **kw)
    assert np.abs(changed.astype(int) - plain.astype(int)).mean() > 1  # the LoRAs change the picture
    with pytest.raises(ValueError, match="nope.safetensors"):
        pipe.load_lora(tmp_path / "nope.safetensors")
    assert len(pipe.loras) == 2  # a failed load changes nothing
    pipe.remove_loras()
    assert pipe.loras == []
    for k, v in flatten_dict(pipe.params).items():
        assert v is placed[k] and np.array_equal(np.asarray(v), np.asarray(base[k])), k
    np.testing.assert_array_equal(pipe("a red circle", **kw), plain)


def test_txt2img_lora_flag_and_metadata(tmp_path, capsys):
    from minidiff.cli import main
    from minidiff.images import read_metadata
    from minidiff.lora import file_sha256
    from minidiff.pipeline import load_pipeline

    a = _mini_lora(load_pipeline(), tmp_path / "style.safetensors", np.random.default_rng(4))
    out = tmp_path / "out.png"
    assert main(["txt2img", "a red circle", "--steps", "2", "--no-progress", "--lora", f"{a}:0.7", "--lora", str(a),
                 "-o", str(out)]) == 0
    meta = read_metadata(out)
    loras = json.loads(meta["loras"])
    assert loras == [{"file": "style.safetensors", "sha256": file_sha256(a)[:12], "scale": 0.7},
                     {"file": "style.safetensors", "sha256": file_sha256(a)[:12], "scale": 1.0}]
    capsys.readouterr()
    assert main(["txt2img", "x", "--lora", str(tmp_path / "nope.safetensors"), "-o", str(out)]) == 2
    assert capsys.readouterr().err.strip().endswith("nope.safetensors: no such file")
    (tmp_path / "l.pt").write_bytes(b"\0")
    assert main(["txt2img", "x", "--lora", str(tmp_path / "l.pt"), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "safetensors files only" in err
    # keys for another model: one line from the loader
    xl = _save(tmp_path / "xl.safetensors", {"lora_unet_foo_attn1_to_q.lora_down.weight": np.ones((2, 6)),
                                              "lora_unet_foo_attn1_to_q.lora_up.weight": np.ones((5, 2))})
    assert main(["txt2img", "x", "--no-progress", "--lora", f"{xl}:0.5", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "xl.safetensors: none of its 1 LoRA layers matches" in err


# --- parity with diffusers on the random SD 1.x / 2.x fixtures ---------------------------------------

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("peft")  # diffusers' load_lora_weights needs it

import sd_fixtures as fx  # noqa: E402

_UNET_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
                 "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2")
_TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _targets(model, names):
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and n.endswith(names)
            and (not n.endswith(("conv1", "conv2")) or ".resnets." in n)}


def _factors(module, rank, rng):
    """Random (down, up) for a torch Linear (out, in) or Conv2d (out, in, k, k) (LoCon: k x k down, 1 x 1 up);
    up non-zero, so that the LoRA changes the outputs."""
    w = module.weight
    fan_in = int(np.prod(w.shape[1:]))
    down = rng.standard_normal((rank, *w.shape[1:])) / np.sqrt(fan_in)
    up = rng.standard_normal((w.shape[0], rank, *([1, 1] if w.ndim == 4 else []))) * (0.3 / np.sqrt(rank))
    return down.astype(np.float32), up.astype(np.float32)


def _write(path, made, fmt, rng, rank=4, alpha=None, ldm=False):
    """A LoRA file over every target layer of made.unet and made.text.  fmt "peft": diffusers names
    (lora_A / lora_B), alpha in lora_adapter_metadata; fmt "kohya": lora_unet_ / lora_te_ names, the UNet
    with diffusers or (``ldm``) ldm module paths, a per-layer alpha.  Returns (path, {(model, module):
    (down, up, alpha)}) for the hand-fused reference."""
    tensors, layers = {}, {}
    cfg = made.unet.config
    attention = [t.startswith("CrossAttn") for t in cfg.down_block_types]
    for which, model, names in (("unet", made.unet, _UNET_TARGETS), ("text", made.text, _TEXT_TARGETS)):
        for name, module in _targets(model, names).items():
            down, up = _factors(module, rank, rng)
            a = alpha if alpha is not None else float(rank)
            if fmt == "peft":
                prefix = f"{'unet' if which == 'unet' else 'text_encoder'}.{name}"
                tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = down, up
            else:
                if which == "unet":
                    module_name = fx.ldm_unet_name(name + ".weight", cfg.layers_per_block, attention)[:-7] if ldm else name
                    prefix = "lora_unet_" + module_name.replace(".", "_")
                else:
                    prefix = "lora_te_text_model_" + name.removeprefix("text_model.").replace(".", "_")
                tensors[f"{prefix}.lora_down.weight"], tensors[f"{prefix}.lora_up.weight"] = down, up
                tensors[f"{prefix}.alpha"] = np.array(a, np.float32)
            layers[(which, name)] = (down, up, a)
    meta = None
    if fmt == "peft" and alpha is not None:
        meta = {"lora_adapter_metadata": json.dumps({
            "unet.r": rank, "unet.lora_alpha": alpha, "unet.target_modules": sorted(_targets(made.unet, _UNET_TARGETS)),
            "text_encoder.r": rank, "text_encoder.lora_alpha": alpha,
            "text_encoder.target_modules": sorted(_targets(made.text, _TEXT_TARGETS))})}
    return _save(path, tensors, meta), layers


def _hand_fuse(model_pairs, loras):
    """The reference formula in torch: W += scale * (alpha / rank) * (up @ down), for each (layers, scale)."""
    import copy

    out = {which: copy.deepcopy(m) for which, m in model_pairs.items()}
    with torch.no_grad():
        for layers, scale in loras:
            for (which, name), (down, up, alpha) in layers.items():
                w = out[which].get_submodule(name).weight
                delta = torch.from_numpy(up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(w.shape)
                w += scale * (alpha / down.shape[0]) * delta
    return out


class Made:
    pass


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def made(request, tmp_path_factory):
    from minidiff.convert import read_checkpoint

    family = request.param
    m = Made()
    m.family = family
    spec = fx.SD1_SMALL if family == "sd1" else fx.SD2_SMALL
    unet, vae, text = fx.build_models(spec, seed=5)
    m.root = tmp_path_factory.mktemp(f"lora_{family}")
    m.folder = fx.save_diffusers_folder(m.root / "folder", unet, vae, text, family)
    m.pipe = diffusers.StableDiffusionPipeline.from_pretrained(m.folder, safety_checker=None, requires_safety_checker=False)
    m.unet, m.text = m.pipe.unet.eval(), m.pipe.text_encoder.eval()  # SD 2.x: the penultimate-layer encoder
    m.params, m.config = read_checkpoint(m.folder)
    rng = np.random.default_rng(6)
    m.x = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    m.t = np.array([10, 981])
    m.ctx = rng.standard_normal((2, 77, m.config.unet.cross_attention_dim)).astype(np.float32)
    m.ids = rng.integers(0, m.config.text_encoder.vocab_size, (2, 77))
    return m


def _torch_outputs(unet, text, m):
    with torch.no_grad():
        eps = unet(torch.from_numpy(m.x), torch.from_numpy(m.t), torch.from_numpy(m.ctx)).sample.numpy()
        ctx = text(torch.from_numpy(m.ids)).last_hidden_state.numpy()
    return eps, ctx


def _minidiff_outputs(params, m):
    import jax

    from minidiff.nn.clip import CLIPTextModel
    from minidiff.nn.unet import UNet2DCondition

    eps = jax.jit(UNet2DCondition(m.config.unet).apply)({"params": params["unet"]}, m.x.transpose(0, 2, 3, 1), m.t, m.ctx)
    ctx = jax.jit(CLIPTextModel(m.config.text_encoder).apply)({"params": params["text_encoder"]}, m.ids)
    return np.asarray(eps).transpose(0, 3, 1, 2), np.asarray(ctx.last_hidden_state)


def _relative(got, want):
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def _check(m, fused_params, reference, base, what, tol=1e-5):
    got_eps, got_ctx = _minidiff_outputs(fused_params, m)
    for name, got, want, plain in (("UNet", got_eps, reference[0], base[0]), ("text encoder", got_ctx, reference[1], base[1])):
        rel, effect = _relative(got, want), _relative(plain, want)
        print(f"{m.family} {what} {name}: relative error {rel:.1e} (the LoRA moved the output by {effect:.1e})")
        assert effect > 100 * tol, (what, name, effect)  # the LoRA does change the output
        assert rel <= tol, (what, name, rel)


def _via_diffusers(made, files):
    """The outputs after diffusers' load_lora_weights (each file an adapter) + set_adapters (the
    scales) + fuse_lora."""
    import copy

    pipe = copy.deepcopy(made.pipe)
    names = [f"l{i}" for i in range(len(files))]
    for (path, _), name in zip(files, names):
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(names, adapter_weights=[scale for _, scale in files])
    pipe.fuse_lora(adapter_names=names)
    return _torch_outputs(pipe.unet, pipe.text_encoder, made)


@pytest.mark.parity
@pytest.mark.slow
def test_peft_files_match_diffusers_load_and_fuse(made, tmp_path):
    """Two diffusers / PEFT files (one with lora_alpha != rank in its metadata, one without: alpha = rank),
    each with its own scale, against diffusers' load_lora_weights + fuse_lora."""
    rng = np.random.default_rng(7)
    a, _ = _write(tmp_path / "a.safetensors", made, "peft", rng, rank=4, alpha=2.0)
    b, _ = _write(tmp_path / "b.safetensors", made, "peft", rng, rank=2)
    base = _torch_outputs(made.unet, made.text, made)
    reference = _via_diffusers(made, [(a, 0.7), (b, -1.3)])
    fused, _ = fuse_loras(made.params, [(read_lora(a), 0.7), (read_lora(b), -1.3)],
                          made.config.unet.layers_per_block)
    _check(made, fused, reference, base, "PEFT x2")


@pytest.mark.parity
@pytest.mark.slow
def test_kohya_files_match_diffusers_and_the_formula(made, tmp_path):
    """kohya names with a per-layer alpha, including LoCon convolutions (resnets' conv1 / conv2: a 3x3
    down, a 1x1 up): the diffusers module paths against diffusers' own kohya loader (load_lora_weights
    + fuse_lora) and against the formula fused by hand in torch; the ldm module paths
    (input_blocks_1_1_...) with a second file on top, against the formula fused by hand (diffusers
    cannot read those for SD 1.x / 2.x)."""
    rng = np.random.default_rng(8)
    a, layers_a = _write(tmp_path / "kohya.safetensors", made, "kohya", rng, rank=4, alpha=1.0)
    b, layers_b = _write(tmp_path / "kohya_ldm.safetensors", made, "kohya", rng, rank=3, alpha=6.0, ldm=True)
    base = _torch_outputs(made.unet, made.text, made)
    lpb = made.config.unet.layers_per_block

    fused_a, _ = fuse_loras(made.params, [(read_lora(a), 0.9)], lpb)
    hand = _hand_fuse({"unet": made.unet, "text": made.text}, [(layers_a, 0.9)])
    _check(made, fused_a, _torch_outputs(hand["unet"], hand["text"], made), base, "kohya vs the formula")
    _check(made, fused_a, _via_diffusers(made, [(a, 0.9)]), base, "kohya vs diffusers")

    fused, _ = fuse_loras(made.params, [(read_lora(a), 0.9), (read_lora(b), 0.4)], lpb)
    hand = _hand_fuse({"unet": made.unet, "text": made.text}, [(layers_a, 0.9), (layers_b, 0.4)])
    _check(made, fused, _torch_outputs(hand["unet"], hand["text"], made), base, "kohya + kohya ldm vs the formula")
    # (not against diffusers: 0.42's kohya converter turns SD 1.x / 2.x ldm paths into names no module
    # has, NoMatchingPeftModuleError "Target modules {'8.0.conv1', 'mid_block.1.proj_in', ...}")
