"""Read a stylegan2-ada-pytorch network pickle (`network-snapshot-*.pkl`) into sqgan's StyleGAN2, running none of
the pickle's code.

The format (NVlabs/stylegan2-ada-pytorch, `torch_utils/persistence.py`, version 6; `training/training_loop.py`
writes the snapshot): the file is a plain `pickle.dump` of a dict `{G, D, G_ema, augment_pipe,
training_set_kwargs}`. Each network is an instance of a `@persistence.persistent_class`, whose `__reduce__` stores
`torch_utils.persistence._reconstruct_persistent_obj(meta)` with `meta = {type: 'class', version: 6, module_src:
<the source of training/networks.py>, class_name: 'Generator' | 'MappingNetwork' | …, state: <the nn.Module's
__dict__>}`. The state holds `_parameters`, `_buffers` and `_modules` (sub-networks, persistent objects themselves),
the plain attributes (`z_dim`, `img_resolution`, …) and `_init_kwargs`, the constructor's keyword arguments
(`mapping_kwargs`, `synthesis_kwargs`, `epilogue_kwargs`, … as `dnnlib.EasyDict`). Tensors are pickled the way
torch pickles them: `torch._utils._rebuild_tensor_v2` / `_rebuild_parameter` over a storage saved by
`torch.storage._load_from_bytes(bytes)`.

Unpickling it normally imports `torch_utils` and `dnnlib` and executes `module_src`. Here a restricted unpickler
maps `_reconstruct_persistent_obj` to a record of the meta (the source is kept as text, never run),
`dnnlib.EasyDict` to a dict, storages to `torch.load(…, weights_only=True)`, and refuses every other global that is
not plain data, a tensor or torch storage: a pickle that asks for `os.system` fails before anything runs.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sqgan.models.stylegan2 import fir_filter

PERSISTENCE_VERSION = 6  # torch_utils.persistence._version of every public stylegan2-ada(-pytorch) / stylegan3 pickle


@dataclass
class Persistent:
    """A persistent object as the pickle stored it: its class name, the module source (text) and its state."""

    class_name: str
    state: dict[str, Any]
    module_src: str = field(repr=False, default="")
    version: int = PERSISTENCE_VERSION

    def module(self, name: str) -> Persistent | None:
        sub = self.state.get("_modules", {}).get(name)
        return sub if isinstance(sub, Persistent) else None

    @property
    def init_kwargs(self) -> dict[str, Any]:
        return dict(self.state.get("_init_kwargs") or {})


class EasyDict(dict):
    """What `dnnlib.EasyDict` (a dict with attribute access) becomes: a dict."""


def _persistent(meta: dict[str, Any]) -> Persistent:
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
        raise pickle.UnpicklingError("a torch_utils.persistence object without the class meta it should carry")
    return Persistent(meta["class_name"], dict(meta.get("state") or {}), str(meta.get("module_src") or ""),
                      int(meta.get("version", -1)))


def _storage(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def _numpy_globals() -> dict[tuple[str, str], Any]:
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # numpy 2 | 1
    out: dict[tuple[str, str], Any] = {("numpy", "dtype"): np.dtype, ("numpy", "ndarray"): np.ndarray}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1 and 2 name them differently
        out[(mod, "scalar")] = multiarray.scalar
        out[(mod, "_reconstruct")] = multiarray._reconstruct
    return out


SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent,
    ("dnnlib.util", "EasyDict"): EasyDict,
    ("dnnlib", "EasyDict"): EasyDict,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _storage,
    ("torch", "Size"): torch.Size,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
}


class ImportRefused(ValueError):
    """The file is not a stylegan2-ada network pickle sqgan can import; the message says what it is instead."""


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file)
        self.path = path
        self.allowed = SAFE_GLOBALS | _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed.get((module, name))
        if found is not None:
            return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.startswith("dnnlib.tflib"):
            raise ImportRefused(f"{self.path}: a TensorFlow StyleGAN pickle ({module}.{name}); sqgan reads "
                                f"stylegan2-ada-pytorch pickles: convert it with that repository's legacy.py "
                                f"(`python legacy.py` loads it and re-saves with torch), then import the result")
        raise ImportRefused(f"{self.path}: the pickle asks for {module}.{name}, which is not plain data, a tensor or "
                            f"a stylegan2-ada network; nothing in it was executed. Import only network-snapshot-*.pkl "
                            f"files that stylegan2-ada-pytorch wrote")


def read_pickle(path: str | Path) -> dict[str, Any]:
    """The snapshot dict of a stylegan2-ada network pickle, its networks as `Persistent` records."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; pass a stylegan2-ada network-snapshot-*.pkl")
    with path.open("rb") as f:
        try:
            data = _Unpickler(f, path).load()
        except ImportRefused:
            raise
        except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError,
                KeyError, RuntimeError, UnicodeDecodeError) as e:
            what = "truncated" if isinstance(e, EOFError) else f"not a readable pickle ({type(e).__name__}: {e})"
            raise ImportRefused(f"{path}: {what}; pass a whole network-snapshot-*.pkl that stylegan2-ada-pytorch "
                                f"wrote (download it again if it was cut short)") from None
    if isinstance(data, Persistent):  # a bare network pickled on its own
        data = {data.class_name: data}
    if not isinstance(data, dict) or not isinstance(data.get("G_ema"), Persistent):
        keys = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise ImportRefused(f"{path}: no G_ema network in it (found {keys}); pass a stylegan2-ada "
                            f"network-snapshot-*.pkl")
    return data


def flat_state(obj: Persistent, prefix: str = "") -> dict[str, torch.Tensor]:
    """Parameters and buffers of a persistent network and its sub-networks, by dotted name (as `state_dict`)."""
    out: dict[str, torch.Tensor] = {}
    st = obj.state
    for group in ("_parameters", "_buffers"):
        for name, t in (st.get(group) or {}).items():
            if t is not None:
                out[prefix + name] = t.detach() if isinstance(t, torch.Tensor) else t
    for name, sub in (st.get("_modules") or {}).items():
        if sub is None:
            continue
        if not isinstance(sub, Persistent):
            raise ImportRefused(f"sub-network {prefix + name} is a {type(sub).__name__}, not a stylegan2-ada layer")
        out.update(flat_state(sub, f"{prefix}{name}."))
    return out


@dataclass
class AdaNetworks:
    """What an import needs: sqgan's model params and the three networks' tensors under sqgan's names."""

    model: dict[str, Any]  # model.* params
    G: dict[str, torch.Tensor]
    G_ema: dict[str, torch.Tensor]
    D: dict[str, torch.Tensor] | None
    kwargs: dict[str, Any]  # the networks' init kwargs, flattened (logged as params)
    training_set: dict[str, Any]  # training_set_kwargs of the snapshot, when present


def _kw(obj: Persistent, name: str, default: Any) -> Any:
    v = obj.init_kwargs.get(name, obj.state.get(name, default))
    return default if v is None and default is not None else v


def _check_generator(G: Persistent, path: Path) -> None:
    synthesis, mapping = G.module("synthesis"), G.module("mapping")
    if synthesis is None or mapping is None:
        raise ImportRefused(f"{path}: its G_ema ({G.class_name}) has no mapping/synthesis networks; not a "
                            f"stylegan2-ada generator")
    if synthesis.module("input") is not None or "class SynthesisInput" in synthesis.module_src:
        raise ImportRefused(f"{path}: a StyleGAN3 network (its synthesis starts with a SynthesisInput and "
                            f"L0_… layers); sqgan's StyleGAN2 cannot compute it. Import a stylegan2-ada pickle")
    c_dim = int(_kw(G, "c_dim", 0) or 0)
    if c_dim > 0:
        raise ImportRefused(f"{path}: a class-conditional network (c_dim = {c_dim}); sqgan imports unconditional "
                            f"networks only: ada's mapping takes its class embedding beside z (concatenated), sqgan's "
                            f"conditional G adds one to z, so the weights do not carry over; train it with "
                            f"model.conditional instead")
    arch = synthesis.init_kwargs.get("architecture") or G.init_kwargs.get("synthesis_kwargs", {}).get("architecture")
    if arch not in (None, "skip"):
        raise ImportRefused(f"{path}: a generator with the '{arch}' architecture; sqgan's StyleGAN2 is 'skip' "
                            f"(config F)")
    if int(_kw(G, "img_channels", 3)) != 3:
        raise ImportRefused(f"{path}: img_channels = {_kw(G, 'img_channels', 3)}; sqgan generates RGB (3)")


def networks_of(data: dict[str, Any], path: str | Path) -> AdaNetworks:
    """sqgan params and tensors of a snapshot read by `read_pickle`; ImportRefused names what does not fit."""
    path = Path(path)
    G_ema = data["G_ema"]
    _check_generator(G_ema, path)
    mapping, synthesis = G_ema.module("mapping"), G_ema.module("synthesis")
    assert mapping is not None and synthesis is not None
    gk = G_ema.init_kwargs
    sk = dict(gk.get("synthesis_kwargs") or {})
    mk = dict(gk.get("mapping_kwargs") or {})
    lr_mul = float(mk.get("lr_multiplier", mapping.init_kwargs.get("lr_multiplier", 0.01)))
    if not math.isclose(lr_mul, 0.01):
        raise ImportRefused(f"{path}: its mapping network's lr_multiplier is {lr_mul:g}; sqgan's is 0.01 "
                            f"(stylegan2-ada's default), and the stored weights are scaled by it")
    if int(mk.get("embed_features") or 0) or int(mapping.state.get("c_dim", 0) or 0):
        raise ImportRefused(f"{path}: its mapping network embeds labels; sqgan imports unconditional networks only")
    model: dict[str, Any] = {
        "arch": "stylegan2",
        "resolution": int(_kw(G_ema, "img_resolution", 0)),
        "z_dim": int(_kw(G_ema, "z_dim", 512)),
        "w_dim": int(_kw(G_ema, "w_dim", 512)),
        "mapping_layers": int(mapping.state.get("num_layers", mk.get("num_layers", 8))),
        "channel_base": int(sk.get("channel_base", 32768)),
        "channel_max": int(sk.get("channel_max", 512)),
        "conv_clamp": sk.get("conv_clamp"),
    }
    kwargs = _flatten({"G": gk}) | {"G.mapping.w_avg_beta": mapping.state.get("w_avg_beta", 0.995)}
    D_obj = data.get("D")
    D_state = None
    if isinstance(D_obj, Persistent):
        dk = D_obj.init_kwargs
        ek = dict(dk.get("epilogue_kwargs") or {})
        if (dk.get("architecture") or "resnet") != "resnet":
            raise ImportRefused(f"{path}: a discriminator with the '{dk.get('architecture')}' architecture; sqgan's "
                                f"StyleGAN2 D is 'resnet' (config F)")
        if int(dk.get("c_dim", 0) or 0):
            raise ImportRefused(f"{path}: a class-conditional discriminator (c_dim = {dk.get('c_dim')})")
        for key, what in (("channel_base", "channel_base"), ("channel_max", "channel_max")):
            if key in dk and int(dk[key]) != model[what]:
                raise ImportRefused(f"{path}: D's {key} ({dk[key]}) differs from G's ({model[what]}); sqgan builds "
                                    f"both from one model.{what}")
        if dk.get("conv_clamp") != model["conv_clamp"]:
            raise ImportRefused(f"{path}: D's conv_clamp ({dk.get('conv_clamp')}) differs from G's "
                                f"({model['conv_clamp']}); sqgan builds both from one model.conv_clamp")
        model["mbstd_group_size"] = int(ek.get("mbstd_group_size") or 4)
        model["mbstd_num_channels"] = int(ek.get("mbstd_num_channels", 1))
        D_state = d_names(flat_state(D_obj), model["resolution"])
        kwargs |= _flatten({"D": dk})
    if model["resolution"] <= 0:
        raise ImportRefused(f"{path}: its G_ema records no img_resolution")
    training_set = dict(data.get("training_set_kwargs") or {})
    G_obj = data.get("G")
    return AdaNetworks(model, flat_state(G_obj) if isinstance(G_obj, Persistent) else flat_state(G_ema),
                       flat_state(G_ema), D_state, kwargs, training_set)


def d_names(state: dict[str, torch.Tensor], resolution: int) -> dict[str, torch.Tensor]:
    """stylegan2-ada's D names (b256.conv0.weight, …, b4.fc.weight) → sqgan's (trunk.blocks.0.conv0.weight, …,
    trunk.head.fc.weight): block i of the trunk is the one at resolution R / 2^i, the epilogue b4 its head."""
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        m = re.fullmatch(r"b(\d+)\.(.+)", key)
        if m is None:
            out[key] = t  # left as is: the strict load names it
            continue
        res, rest = int(m.group(1)), m.group(2)
        if res == 4:
            out[f"trunk.head.{rest}"] = t
        else:
            out[f"trunk.blocks.{int(math.log2(resolution // res))}.{rest}"] = t
    return out


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        elif isinstance(v, str | int | float | bool) or v is None:
            out[f"{prefix}{k}"] = v
        else:
            out[f"{prefix}{k}"] = repr(v)
    return out


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, path: Path) -> None:
    """Copy `state` into `module`: every parameter and persistent buffer must be there with its shape; a buffer sqgan
    keeps out of its state (the FIR resampling filter) must hold the same values; nothing may be left over."""
    own = module.state_dict()
    fixed = dict(module.named_buffers())
    # ada registers the FIR filter in a few more modules than sqgan (its DiscriminatorBlock): checked as the others
    fixed |= {k: fir_filter() for k in state if k.endswith("resample_filter") and k not in own and k not in fixed}
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own and k not in fixed]
    if missing or extra:
        shown = ", ".join((missing + extra)[:4])
        raise ImportRefused(f"{path}: its {what} does not fit sqgan's StyleGAN2 built from its kwargs "
                            f"({len(missing)} tensors missing, {len(extra)} unknown: {shown})")
    for k, t in state.items():
        ref = own[k] if k in own else fixed[k]
        if k not in own and t.dim() == 2 and ref.dim() == 1:  # ada keeps a 4-tap FIR filter as its 2-D outer product
            ref = torch.outer(ref, ref)
            t, ref = t / t.sum(), ref / ref.sum()
        if tuple(t.shape) != tuple(ref.shape):
            raise ImportRefused(f"{path}: {what} tensor {k} has shape {list(t.shape)}, sqgan's StyleGAN2 built from "
                                f"its kwargs has {list(ref.shape)}")
        if k not in own and not torch.allclose(t.float(), ref.float()):
            raise ImportRefused(f"{path}: {what} buffer {k} differs from sqgan's fixed one (a resampling filter other "
                                f"than [1, 3, 3, 1]?); sqgan's StyleGAN2 cannot compute it")
    module.load_state_dict({k: state[k].to(own[k].dtype) for k in own}, strict=True)
