"""The one CLIP loader: an open_clip model and its image transform, with the weights checked before anything loads.

SQ's codebook prior (`sqgan prior`, prior.clip_*), the cluster-guided sampler's CLIP features and FFHQ-2.5k's
`--features clip` (data.ffhq2k5.model/pretrained) all load CLIP here, so a missing file, an unknown tag or an
offline hub gets the same fast, named error everywhere.
"""

from __future__ import annotations

import os
import socket
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn


def _how(key: str) -> str:
    return _HOW_TO_GET_WEIGHTS.format(key=key)


_HOW_TO_GET_WEIGHTS = (
    "download the weights where the internet is reachable (e.g. open_clip ViT-B-32 laion2b_s34b_b79k: "
    "open_clip_pytorch_model.bin from https://huggingface.co/laion/CLIP-ViT-B-32-laion2B-s34B-b79K), copy the file "
    "here and set {key} to its path"
)


class ClipWeightsUnavailable(RuntimeError):
    """The CLIP weights a param names cannot be had here (missing file, hub offline)."""


def _hub_offline() -> bool:
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if env.strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    try:
        # on demand: the hub cache matters only when CLIP weights are looked up
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - open_clip depends on it
        return False
    return bool(constants.HF_HUB_OFFLINE)  # read at import time: also honour a process started offline


def _tag_is_cached(cfg: dict[str, Any]) -> bool:
    """Whether the weights of an open_clip pretrained tag are in the local hub or URL cache (no network)."""
    if cfg.get("file"):
        return os.path.isfile(cfg["file"])
    hub = cfg.get("hf_hub", "")
    if hub:
        # on demand: the hub cache matters only when CLIP weights are looked up
        from huggingface_hub import try_to_load_from_cache
        from open_clip.pretrained import HF_WEIGHTS_NAME, _get_safe_alternatives

        repo, filename = os.path.split(hub)
        filename = filename or HF_WEIGHTS_NAME
        for name in [*_get_safe_alternatives(filename), filename]:  # open_clip tries .safetensors first
            if isinstance(try_to_load_from_cache(repo, name), str):
                return True
    url = cfg.get("url", "")
    return bool(url) and os.path.isfile(os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url)))


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether the host of `url` accepts a TCP connection within `timeout` s (one try: no retries, no request)."""
    parsed = urlparse(url)
    if not parsed.hostname:
        return False
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_endpoint() -> str:
    try:
        # on demand: the hub cache matters only when CLIP weights are looked up
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - open_clip depends on it
        return "https://huggingface.co"
    return str(constants.ENDPOINT)


def _looks_like_path(name: str) -> bool:
    """A value no open_clip tag can be: it has a folder separator or a weights-file extension."""
    return "/" in name or os.sep in name or name.endswith((".bin", ".pt", ".pth", ".safetensors", ".ckpt"))


def load_clip(model_name: str, pretrained: str | None, device: str | torch.device = "cpu",
              key: str = "prior.clip_pretrained") -> tuple[nn.Module, Any]:
    """A pre-trained open_clip CLIP (eval mode, on `device`) and its evaluation image transform.

    Args:
        model_name: an open_clip architecture ("ViT-B-32"), or an "hf-hub:" / "local-dir:" name (then `pretrained`
            is ignored, as in open_clip).
        pretrained: an open_clip tag ("laion2b_s34b_b79k") or a local weights file.
        key: the param that names the weights (prior.clip_pretrained, data.ffhq2k5.pretrained), for the messages.

    Fails fast, with `ClipWeightsUnavailable` naming `key` and how to provide weights, before
    anything is built or fetched, when `pretrained` is None (a random CLIP makes the prior meaningless), a path that
    does not exist, or a tag whose weights are not cached while the hub is offline (HF_HUB_OFFLINE=1) or
    unreachable (one 3 s connection attempt instead of the hub client's minute of retries).
    """
    if pretrained and _looks_like_path(pretrained) and not model_name.startswith(("hf-hub:", "local-dir:")):
        if not os.path.isfile(pretrained):  # checked before importing open_clip (seconds)
            raise ClipWeightsUnavailable(
                f"{key} = {pretrained!r}: no such file; {_how(key)}")
    # on demand: CLIP is optional and heavy (loaded only when CLIP features are asked for)
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    schema = model_name.startswith(("hf-hub:", "local-dir:"))
    if not schema:
        if not pretrained:
            raise ClipWeightsUnavailable(
                f"{key} is not set; CLIP {model_name!r} without pre-trained weights is a random network, "
                f"useless here: {_how(key)}")
        tag_cfg = get_pretrained_cfg(model_name, pretrained)
        if not tag_cfg:
            if not os.path.isfile(pretrained):
                tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)[:6]) or "none"
                raise ClipWeightsUnavailable(
                    f"{key} = {pretrained!r} is neither an existing file nor an open_clip tag of "
                    f"{model_name!r} (tags include {tags}); {_how(key)}")
        elif not _tag_is_cached(tag_cfg):
            if _hub_offline():
                raise ClipWeightsUnavailable(
                    f"{key} = {pretrained!r} is an open_clip tag, but the hub is offline "
                    f"(HF_HUB_OFFLINE=1) and its weights are not cached; {_how(key)}")
            source = _hub_endpoint() if tag_cfg.get("hf_hub") else tag_cfg.get("url", "")
            if not _reachable(source):
                raise ClipWeightsUnavailable(
                    f"{key} = {pretrained!r} is an open_clip tag whose weights are not cached, and "
                    f"{urlparse(source).hostname} cannot be reached; {_how(key)}")
    elif model_name.startswith("hf-hub:"):
        # on demand: the hub cache matters only when CLIP weights are looked up
        from huggingface_hub import try_to_load_from_cache

        cached = isinstance(try_to_load_from_cache(model_name.removeprefix("hf-hub:"), "open_clip_config.json"), str)
        if not cached and (_hub_offline() or not _reachable(_hub_endpoint())):
            raise ClipWeightsUnavailable(
                f"CLIP {model_name!r} is not cached and the hub is offline or unreachable; {_how(key)}")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=None if schema else pretrained, device=device)
    except Exception as e:  # a corrupt or mismatched file, a failed download
        raise ClipWeightsUnavailable(
            f"could not load CLIP {model_name!r} with {key} = {pretrained!r} ({e}); "
            f"{_how(key)}") from None
    return model.eval(), preprocess
