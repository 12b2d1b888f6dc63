"""Pretrained weights without waiting on a network that is not there.

timm fetches weights from the Hugging Face hub (or a URL); offline, the hub client retries for
about a minute before failing. One bounded connect probe decides first: reachable, timm downloads
as usual; unreachable, weights already in the local cache are used, else the caller starts from
random init at once.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub
import torch

log = logging.getLogger(__name__)

HUB_TIMEOUT_S = 3.0
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")


def weights_source(pretrained_cfg: dict) -> str | None:
    """URL whose host serves these weights: the hub endpoint for hub weights, else the plain URL."""
    if pretrained_cfg.get("hf_hub_id"):
        return huggingface_hub.constants.ENDPOINT
    return pretrained_cfg.get("url") or None


def reachable(url: str, timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether ``url``'s host accepts a TCP connection within ``timeout`` seconds, name lookup included.

    The probe runs in a daemon thread because a hanging DNS lookup ignores socket timeouts.
    """
    if huggingface_hub.constants.HF_HUB_OFFLINE and url == huggingface_hub.constants.ENDPOINT:
        return False  # the hub client's own offline switch: no probe
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    answered: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((parsed.hostname, port), timeout=timeout).close()
            answered.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    log.debug("%s:%d %s", parsed.hostname, port, "answered" if answered else f"did not answer within {timeout:g} s")
    return bool(answered)


def cached_weights(pretrained_cfg: dict) -> Path | None:
    """A local copy of these weights (hub cache or torch hub cache), or None."""
    hub_id = pretrained_cfg.get("hf_hub_id")
    if hub_id:
        names = (pretrained_cfg["hf_hub_filename"],) if pretrained_cfg.get("hf_hub_filename") else _HUB_FILES
        for name in names:
            found = huggingface_hub.try_to_load_from_cache(hub_id, name)
            if isinstance(found, str):
                return Path(found)
    url = pretrained_cfg.get("url")
    if url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
        if path.is_file():
            return path
    return None
