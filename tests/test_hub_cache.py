"""--model with a Hugging Face hub id: found in the local cache offline, or a clear error."""

from __future__ import annotations

import pytest

from lmserve.models.loader import CheckpointError, bundled_model_path, resolve_checkpoint


def _fake_cache(root, repo_id: str, files: dict[str, bytes | str]) -> None:
    """The hub cache layout: models--org--name/{refs/main, snapshots/<rev>/...}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    rev = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    for name, content in files.items():
        target = snap / name
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.symlink_to(content)


def test_hub_id_found_in_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    _fake_cache(tmp_path, "someone/tiny-gguf", {"model.Q4.gguf": str(bundled_model_path())})
    ckpt = resolve_checkpoint("someone/tiny-gguf")
    assert ckpt.format == "gguf" and ckpt.path.name == "model.Q4.gguf"
    _fake_cache(tmp_path, "someone/tiny-hf", {"config.json": b"{}"})
    assert resolve_checkpoint("someone/tiny-hf").format == "hf"


def test_hub_id_not_in_cache_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint("Qwen/Qwen2.5-7B-Instruct")
    message = str(e.value)
    assert "lmserve does not download models" in message and str(tmp_path) in message
    assert "hf download Qwen/Qwen2.5-7B-Instruct" in message
    with pytest.raises(CheckpointError, match="no such file or directory"):
        resolve_checkpoint(str(tmp_path / "nothing.gguf"))
