"""Checkpoint files -> NumPy arrays: safetensors (no torch), PyTorch pickles (``torch.load(weights_only=True)``
only), JSON configs.

    read_tensors(path)        {name: LazyTensor}, by extension (.safetensors, .ckpt / .bin / .pt / .pth)
    memmap_safetensors(path)  {name: read-only view of the memory-mapped file}
    output_dtype(name)        float32 / float16 / bfloat16 (ml_dtypes: NumPy itself has no bfloat16)

A ``LazyTensor`` knows its shape and dtype and reads its data only when ``np.asarray`` asks, so a
conversion holds one source tensor at a time.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np


class LazyTensor:
    """A tensor in a checkpoint file: its shape and dtype, read only when ``np.asarray`` asks for it
    (so that a conversion holds one source tensor at a time, and reads nothing it does not use)."""

    __slots__ = ("shape", "dtype", "_read")

    def __init__(self, shape, dtype, read):
        self.shape, self.dtype, self._read = tuple(shape), np.dtype(dtype), read

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __array__(self, dtype=None, copy=None):
        a = self._read()
        return a if dtype is None else a.astype(dtype)

    def rows(self, start: int, stop: int) -> "LazyTensor":
        """Rows start..stop-1 (the thirds of a fused q/k/v matrix)."""
        return LazyTensor((stop - start, *self.shape[1:]), self.dtype, lambda: np.asarray(self)[start:stop])

    def __repr__(self) -> str:
        return f"LazyTensor(shape={self.shape}, dtype={self.dtype})"


def bfloat16() -> np.dtype:
    import ml_dtypes  # comes with jax; NumPy itself has no bfloat16

    return np.dtype(ml_dtypes.bfloat16)


DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": None}


def output_dtype(name: str) -> np.dtype:
    """The NumPy dtype of "float32", "float16" or "bfloat16"."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name] or bfloat16()


def safetensors_file(path, what: str) -> Path:
    """``path`` as a Path; a ValueError naming ``what`` ("LoRA", "embedding") when the file is missing or
    is not a ``.safetensors`` file (a pickle is never unpickled for these)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} file not found: {path}")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: {what}s are read from .safetensors files only (a .ckpt/.pt/.bin pickle is not "
                         "unpickled; re-save it with safetensors.torch.save_file)")
    return path


def open_safetensors(path, pread: bool = True):
    """safetensors' ``safe_open`` with the NumPy API (reading with pread where safetensors has it)."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="np", **({"backend": "pread"} if pread else {}))
    except TypeError:  # safetensors < 0.8: no backend argument (tensors are copied out of an mmap)
        return safe_open(str(path), framework="np")


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
                       "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path) -> dict[str, LazyTensor]:
    """The tensors of a ``.safetensors`` file, read lazily with safetensors' NumPy API (no torch).
    bfloat16 comes back as ``ml_dtypes.bfloat16``.  ``ValueError`` if the file is not a complete
    safetensors file."""
    path = Path(path)
    try:
        f = open_safetensors(path)
        keys = list(f.keys())
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) for broken files
        size = path.stat().st_size
        raise ValueError(f"{path} is not a readable .safetensors file ({size:,} bytes): {e} "
                         "(a truncated download, or not a safetensors file)") from None
    out = {}
    for k in keys:
        s = f.get_slice(k)
        code = s.get_dtype()
        dtype = bfloat16() if code == "BF16" else _SAFETENSORS_DTYPES.get(code)
        if dtype is None:
            raise ValueError(f"{path}: tensor {k} has the unsupported dtype {code}")
        read = (lambda k=k: _read_bf16(f, path, k)) if code == "BF16" else (lambda k=k: f.get_tensor(k))
        out[k] = LazyTensor(s.get_shape(), dtype, read)
    return out


def _read_bf16(f, path: Path, key: str) -> np.ndarray:
    """A bfloat16 tensor: safetensors >= 0.8 returns it; older versions cannot, so read its bytes
    (the format: 8-byte little-endian header length, JSON header with data_offsets, then the data)."""
    try:
        return f.get_tensor(key)
    except Exception:
        with open(path, "rb") as raw:
            n = int.from_bytes(raw.read(8), "little")
            entry = json.loads(raw.read(n))[key]
            start, stop = entry["data_offsets"]
            raw.seek(8 + n + start)
            data = np.frombuffer(raw.read(stop - start), np.uint16)
        return data.view(bfloat16()).reshape(entry["shape"])


def _torch():
    try:
        import torch
    except ImportError:
        raise ImportError("reading a .ckpt / .bin checkpoint (a PyTorch pickle) needs torch, which is not "
                          "installed: pip install torch (CPU is enough), or use a .safetensors file") from None
    return torch


def _torch_array(t):
    torch = _torch()
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # NumPy has no bfloat16: reinterpret the bits
        return t.view(torch.int16).numpy().view(bfloat16())
    return t.numpy()


def read_torch_pickle(path) -> tuple[dict[str, LazyTensor], dict]:
    """The tensors of a PyTorch checkpoint (``.ckpt``, ``pytorch_model.bin``), loaded ONLY with
    ``torch.load(weights_only=True)``: its restricted unpickler builds tensors and plain containers
    and refuses any other object, so a pickle cannot run code (a plain unpickler would run whatever
    the file asks for).  The file is memory-mapped where torch can.  A Lightning ``state_dict``
    wrapper is unwrapped.  Returns (tensors, other top-level entries such as ``global_step``)."""
    import pickle
    import warnings

    torch = _torch()
    path = Path(path)
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4": a refusal is reported below anyway
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)  # a bare pickle: no mmap
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
        if found:
            what = f"the object {found[1]}"
        else:
            what = "something other than tensors and plain containers" + (f" ({detail[1].strip()})" if detail else "")
        raise ValueError(f"{path}: refused to load: its pickle asks for {what}, and a pickle can run code. minidiff "
                         "reads .ckpt/.bin files only with torch.load(weights_only=True), which builds tensors and "
                         "plain containers only. If you trust the file, re-save its state_dict as .safetensors.") from None
    except Exception as e:  # truncated zip, not a pickle at all, ...
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({path.stat().st_size:,} bytes): "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    extra = {}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        extra = {k: v for k, v in obj.items() if k != "state_dict" and isinstance(v, (int, float, str))}
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict (name -> tensor)")
    tensors = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            tensors[k] = LazyTensor(tuple(v.shape), _torch_array(v[:0] if v.ndim else v).dtype,
                                    lambda v=v: _torch_array(v))
    return tensors, extra


def read_tensors(path) -> tuple[dict[str, LazyTensor], dict]:
    """One checkpoint file by its extension: ``.safetensors``, or a torch pickle (``.ckpt``, ``.bin``,
    ``.pt``, ``.pth``).  Returns (tensors, extra top-level entries)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return read_safetensors(path), {}
    if path.suffix in (".ckpt", ".bin", ".pt", ".pth"):
        return read_torch_pickle(path)
    raise ValueError(f"{path}: unknown checkpoint type {path.suffix!r}: expected a .safetensors or .ckpt file, "
                     "or a diffusers model folder")


def machine_eps(dtype) -> float:
    """Machine epsilon (np.finfo does not know bfloat16)."""
    if dtype == bfloat16():
        import ml_dtypes

        return float(ml_dtypes.finfo(dtype).eps)
    return float(np.finfo(dtype).eps)


ALIGN = 64  # bytes: JAX's CPU backend uses a host array in place (no copy) when it starts at a multiple of 64


def write_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """A ``.safetensors`` file any reader accepts, laid out so that each tensor whose size is a multiple
    of 64 bytes starts at a multiple of 64 from the file's start (those first, the rest after them; the
    JSON header padded with spaces, as the format allows): memory-mapped, they go to a CPU device
    without a copy (:func:`memmap_safetensors`)."""
    codes = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()} | {bfloat16(): "BF16"}
    arrays = {k: np.asarray(v, order="C") for k, v in tensors.items()}  # (ascontiguousarray makes 0-d 1-d)
    order = sorted(arrays, key=lambda k: (arrays[k].nbytes % ALIGN != 0, k))
    header, offset = {"__metadata__": dict(metadata)} if metadata else {}, 0
    for k in order:
        a = arrays[k]
        if a.dtype not in codes:
            raise ValueError(f"{path}: tensor {k} has a dtype safetensors cannot hold ({a.dtype})")
        header[k] = {"dtype": codes[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)  # the data starts at a multiple of 64
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for k in order:
            f.write(arrays[k].reshape(-1).view(np.uint8).data)


def memmap_safetensors(path) -> dict[str, np.ndarray]:
    """Read-only views of every tensor of a (validated) safetensors file, memory-mapped.  The format:
    an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, the data."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    data = np.memmap(path, np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, entry in header.items():
        dtype = bfloat16() if entry["dtype"] == "BF16" else np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]])
        start, stop = entry["data_offsets"]
        out[name] = np.asarray(data[start:stop]).view(dtype).reshape(entry["shape"])  # a view, not a copy
    return out
