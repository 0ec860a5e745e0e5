"""A Hugging Face hub id (`Qwen/Qwen2.5-7B-Instruct`) given as a model: found in the local hub
cache, offline. lmserve never downloads weights; the error says so and where it looked."""

from __future__ import annotations

import re
from pathlib import Path

# org/name, as the hub spells repository ids (and not a relative path that merely has a slash)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class NotInCache(LookupError):
    pass


def looks_like_repo_id(model: str) -> bool:
    return bool(_REPO_ID.match(model)) and not model.endswith((".gguf", ".json"))


def find_cached(repo_id: str) -> Path:
    """The checkpoint of `repo_id` in the local cache: the snapshot directory if it has a
    config.json, else its single .gguf file. NotInCache (with where it looked) otherwise."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = constants.HF_HUB_CACHE
    try:
        snapshot = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise NotInCache(
            f"{repo_id!r} is not a file or directory here, nor in the local Hugging Face cache ({cache}; "
            f"set HF_HUB_CACHE or HF_HOME to look elsewhere). lmserve does not download models: fetch it "
            f"first, e.g. `hf download {repo_id}`, or pass a checkpoint directory or .gguf file") from None
    if (snapshot / "config.json").is_file():
        return snapshot
    ggufs = sorted(snapshot.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    if ggufs:
        names = ", ".join(p.name for p in ggufs)
        raise NotInCache(f"{repo_id!r} in the local Hugging Face cache ({snapshot}) holds several GGUF files "
                         f"({names}): pass the one to serve as --model PATH")
    raise NotInCache(f"{repo_id!r} in the local Hugging Face cache ({snapshot}) has neither a config.json nor "
                     "a .gguf file (an incomplete download?)")
