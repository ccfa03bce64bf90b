"""Where EngineArgs.model points: the built-in demo model, a local folder, or a hub id (snapshot_download)."""
from __future__ import annotations

import logging
import re
import socket
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # "org/name"
DEMO = "demo"  # `adallm run demo "Hi"`: the built-in tiny model, where no folder of that name exists


def resolve_model_path(model: Optional[str], revision: Optional[str] = None, what: str = "model") -> Path:
    """what: 'model' or 'tokenizer' (EngineArgs.tokenizer resolves the same way), the name its errors go by."""
    if model is None or (model == DEMO and not Path(DEMO).is_dir()):
        from adallm_core.testing import demo_model_path

        path = demo_model_path()
        logger.info("no model given: using the built-in tiny demo model at %s", path)
        return path
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{what} {model!r} is a file; expected a checkpoint folder (config.json, *.safetensors)")
    if not _HUB_ID.match(model) or model.startswith((".", "/", "~")):
        # Name the machine: on a cluster the folder exists on some nodes and not on others.
        raise ValueError(
            f"{what} {model!r}: no such folder on host {socket.gethostname()!r}, "
            f"and not a hub id of the form 'org/name'"
        )
    from huggingface_hub import snapshot_download

    logger.info("fetching %s from the Hugging Face hub into the standard cache", model)
    try:
        return Path(snapshot_download(model, revision=revision))
    except Exception as e:  # offline, unknown repo, gated, ...: a mistyped local path lands here too
        raise ValueError(f"{what} {model!r}: no such folder on host {socket.gethostname()!r}, and fetching it from "
                         f"the Hugging Face hub failed ({type(e).__name__}: {e})") from e
