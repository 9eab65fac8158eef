"""One training step of each fine-tuning method at Stable Diffusion 1.5 size, on CPU: seconds and peak memory.

    python benchmarks/finetune_sd15_step.py ti           # textual inversion   (README: 12.9 GB, 117 s)
    python benchmarks/finetune_sd15_step.py dreambooth   # Adafactor + gradient checkpointing (16.9 GB)
    python benchmarks/finetune_sd15_step.py lora         # rank 4 on the attention projections (13.1 GB)

Random weights in SD 1.5's shapes (drawn from ``jax.eval_shape``'s shapes: no 1-billion-weight init),
two 64x64 subject pictures.  Prints one JSON line: the loss, whether the model given stayed unchanged,
what moved, the wall seconds (compilation included) and the peak RSS.  One method per process, so that
each peak is its own.  ``tests/test_finetune.py`` runs the DreamBooth step (the largest) and checks it.
"""
import time

t_start = time.perf_counter()
import hashlib, json, resource, sys
import jax, numpy as np
from minidiff.nn.autoencoder import AutoencoderKLConfig
from minidiff.nn.clip import CLIPTextConfig
from minidiff.nn.unet import UNet2DCondition, UNetConfig
from minidiff.nn.clip import CLIPTextModel
from minidiff.nn.autoencoder import AutoencoderKL
from minidiff.pipeline import StableDiffusion, SchedulerConfig
from minidiff.train.finetune import Subject

method = sys.argv[1]
u, v, t = UNetConfig.sd15(), AutoencoderKLConfig.sd(), CLIPTextConfig.sd15()
rng = np.random.default_rng(0)
def random_params(module, *args):  # shapes from eval_shape, values drawn here: no 1-billion-weight init
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args))["params"]
    return jax.tree.map(lambda s: (rng.standard_normal(s.shape, dtype=np.float32) * 0.02).astype(np.float32), shapes)
params = {"unet": random_params(UNet2DCondition(u), np.zeros((1, 8, 8, 4)), np.zeros(1, np.int32), np.zeros((1, 77, 768))),
          "vae": random_params(AutoencoderKL(v), np.zeros((1, 64, 64, 3))),
          "text_encoder": random_params(CLIPTextModel(t), np.zeros((1, 77), np.int32))}
digest = lambda tree: {jax.tree_util.keystr(k): hashlib.sha1(np.asarray(x).tobytes()).hexdigest()
                       for k, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
before = digest(params)
pipe = StableDiffusion(u, v, t, params, scheduler=SchedulerConfig())
subject = Subject(rng.integers(0, 255, (2, 64, 64, 3), dtype=np.uint8), ["a photo of {} dog", "a {} dog on grass"])
if method == "ti":
    from minidiff.train.textual_inversion import TextualInversionConfig, train_textual_inversion
    vector, h = train_textual_inversion(pipe, subject, TextualInversionConfig(token="<dog>", init_word="dog", steps=1, batch=1), progress=False)
    dog = pipe.tokenizer.encode("dog")[0]
    changed = {"vector_moved": bool(not np.array_equal(vector, params["text_encoder"]["embeddings"]["token_embedding"]["embedding"][dog]))}
elif method == "lora":
    from minidiff.train.lora import LoRAConfig, train_lora
    imgs = rng.integers(0, 255, (1, 64, 64, 3), dtype=np.uint8)
    adapters, h = train_lora(pipe, subject, LoRAConfig(steps=1, batch=1, rank=4), progress=False, class_set=(imgs, ["a dog"]))
    changed = {"adapters": len(adapters["unet"]), "up_moved": int(sum(bool(np.any(f["up"])) for f in adapters["unet"].values())),
               "lora_numbers": int(sum(a.size for f in adapters["unet"].values() for a in f.values()))}
else:
    from minidiff.train.dreambooth import DreamBoothConfig, train_dreambooth
    imgs = rng.integers(0, 255, (1, 64, 64, 3), dtype=np.uint8)
    unet, h = train_dreambooth(pipe, subject, DreamBoothConfig(steps=1, batch=1, remat=True, optimizer="adafactor"), progress=False,
                               class_set=(imgs, ["a dog"]))
    d = digest(unet)
    changed = {"unet_leaves": len(d), "unet_unchanged": [k for k in d if d[k] == before["['unet']" + k]]}
print(json.dumps({"method": method, "loss": h["loss"], "others_unchanged": digest(params) == before, **changed,
                  "seconds": round(time.perf_counter() - t_start, 1),
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
