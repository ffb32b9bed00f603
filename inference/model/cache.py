"""An on-disk cache of the embedded model's dequantised weights, for a fast second start.

Dequantising the Q4_1 GGUF takes ~14 s or more on a CPU; reading the same weights back from
safetensors takes well under a second. A GGUF-loaded model refuses `save_pretrained`, so the entry
is written piece by piece (config, generation config, tokenizer, weights) into a temporary
directory and renamed into place in one step: an entry is either complete or absent.

The entry's name is a hash of everything that shapes the weights (the GGUF file's size and mtime,
the dtype, the transformers and torch versions, this cache's format), so upgrading any of them
starts a new entry. A missing, partial, corrupt or unwritable cache never stops start-up: the
caller falls back to the GGUF file and the entry is rewritten.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
MANIFEST = "cache-entry.json"  # written last: an entry without it (or with other contents) is not used
WEIGHTS = "model.safetensors"
STALE_TEMP_AGE_S = 3600


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/sahabat-ai-service`, else `~/.cache/sahabat-ai-service`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sahabat-ai-service"


@dataclass(frozen=True)
class CacheEntry:
    """One cached model: `root/<name>`, valid for exactly the `key` it was written for."""

    root: Path
    key: dict[str, Any]

    @classmethod
    def for_gguf(cls, root: Path, gguf: Path, dtype: Any) -> CacheEntry:
        import torch
        import transformers

        stat = gguf.stat()
        key = {
            "format": CACHE_FORMAT,
            "gguf_file": gguf.name,
            "gguf_size": stat.st_size,
            "gguf_mtime_ns": stat.st_mtime_ns,
            "dtype": str(dtype).removeprefix("torch."),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        }
        return cls(root=root, key=key)

    @property
    def name(self) -> str:
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        stem = Path(str(self.key["gguf_file"])).stem.replace(".", "-")
        return f"{stem}-{self.key['dtype']}-{digest}"

    @property
    def path(self) -> Path:
        return self.root / self.name

    def is_complete(self) -> bool:
        """The manifest matches this key and every file it lists has the size it was written with."""
        try:
            manifest = json.loads((self.path / MANIFEST).read_text(encoding="utf-8"))
            if manifest.get("key") != self.key:
                return False
            files: dict[str, int] = manifest["files"]
            return WEIGHTS in files and all((self.path / n).stat().st_size == size for n, size in files.items())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False

    def load(self, dtype: Any, quantization_config: Any = None, device_map: Any = None) -> tuple[Any, Any] | None:
        """(model, tokenizer) from the entry, or None if it is absent or unusable (then it is removed).

        With a `quantization_config` (bitsandbytes) the weights are quantized as they are read.
        """
        if not self.path.exists():
            return None
        if not self.is_complete():
            logger.warning("model cache entry %s is incomplete or stale; reloading from the GGUF file", self.path)
            self.remove()
            return None
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            model = load_directory(self.path, dtype, quantization_config, device_map)
        except Exception as error:
            logger.warning(
                "model cache entry %s cannot be loaded (%s: %s); reloading from the GGUF file",
                self.path,
                type(error).__name__,
                str(error).splitlines()[0][:200] if str(error) else "",
            )
            self.remove()
            return None
        return model, tokenizer

    def store(self, model: Any, tokenizer: Any) -> bool:
        """Write the entry (temp dir, then one rename). False, with a warning, if that was not possible."""
        temp: Path | None = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._remove_stale_temps()
            temp = Path(tempfile.mkdtemp(prefix=f".tmp-{self.name}-", dir=self.root))
            temp.chmod(0o755)  # mkdtemp makes it private; the entry is a plain cache like any other
            _write_entry(temp, model, tokenizer, self.key)
            if self.path.exists():  # a broken entry that load() could not remove, or another process won
                if self.is_complete():
                    shutil.rmtree(temp, ignore_errors=True)
                    return True
                self.remove()
            try:
                os.rename(temp, self.path)
            except OSError:
                if not self.is_complete():  # another process renaming at the same moment is fine
                    raise
                shutil.rmtree(temp, ignore_errors=True)
            logger.info("cached the dequantised model weights in %s (next start loads from there)", self.path)
            return True
        except Exception as error:
            if temp is not None:
                shutil.rmtree(temp, ignore_errors=True)
            logger.warning(
                "could not write the model cache under %s (%s: %s); start-up goes on without it",
                self.root,
                type(error).__name__,
                error,
            )
            return False

    def remove(self) -> None:
        """Move the entry aside (one rename, so a concurrent reader never sees half of it), then delete it."""
        with contextlib.suppress(OSError):
            trash = Path(tempfile.mkdtemp(prefix=f".tmp-trash-{self.name}-", dir=self.root))
            os.rename(self.path, trash / "entry")
            shutil.rmtree(trash, ignore_errors=True)
        if self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)

    def _remove_stale_temps(self) -> None:
        """Temp dirs left by a process killed mid-write (old enough not to belong to a live writer)."""
        now = time.time()
        for child in self.root.glob(".tmp-*"):
            with contextlib.suppress(OSError):
                if now - child.stat().st_mtime > STALE_TEMP_AGE_S:
                    shutil.rmtree(child, ignore_errors=True)


def load_directory(directory: Path, dtype: Any, quantization_config: Any = None, device_map: Any = None) -> Any:
    """The model saved in `directory` (an entry, or a plain copy), quantized while read if asked.

    A config saved from a GGUF-loaded model names the GGUF loader as its quantization method, and transformers
    refuses a BitsAndBytesConfig for a model "quantized with GgufConfig": such a record is dropped (the weights
    on disk are plain tensors). Entries written by this module never carry it; older copies might.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    if quantization_config is not None:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        if getattr(config, "quantization_config", None) is not None:
            del config.quantization_config
        kwargs.update(config=config, quantization_config=quantization_config, device_map=device_map or "cpu")
    return AutoModelForCausalLM.from_pretrained(directory, **kwargs)


def write_plain_copy(directory: Path, model: Any, tokenizer: Any) -> None:
    """config, generation config, tokenizer and `model.safetensors` of a (GGUF-loaded) model, into `directory`."""
    from safetensors.torch import save_model

    config = copy.deepcopy(model.config)
    # The GGUF loader records itself as a quantization config; the cached weights are plain tensors.
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    save_model(model, str(directory / WEIGHTS), metadata={"format": "pt"})  # handles the tied embeddings


def _write_entry(directory: Path, model: Any, tokenizer: Any, key: dict[str, Any]) -> None:
    write_plain_copy(directory, model, tokenizer)
    files = {p.name: p.stat().st_size for p in directory.iterdir() if p.is_file()}
    manifest = {"key": key, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
