"""VAE latents kept on disk, so a later run on the same images skips the VAE.

One small safetensors file per training image under ``<cache dir>/latents/``. Its name is a hash
of everything the latent depends on: the image file's bytes, the training size, whether the
flipped copy is stored too, and the VAE's weights. A changed image, size or base model therefore
never reads a stale latent; it simply gets a new file. The file holds the VAE's mean and standard
deviation (not one random draw), so a run that reads the cache draws the same latent noise from
its own seed as a run that encodes in memory: both train identically. SDXL's size conditioning
(original size and crop corner) is stored with the latent.

A file that cannot be read (a killed run, a full disk) is ignored and written again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_nb.fsutil import atomic_path

FORMAT = "1"  # bump when what a file holds changes


def vae_fingerprint(vae) -> str:
    """A short hash of the VAE's weights (name, shape and two sums of every tensor): cheap, and
    different for any real change of the model."""
    h = hashlib.sha1()
    with torch.no_grad():
        for name, t in vae.state_dict().items():
            t64 = t.detach().to("cpu", torch.float64)
            h.update(f"{name}{tuple(t.shape)}{t64.sum().item():.10e}{t64.abs().sum().item():.10e}".encode())
    return h.hexdigest()[:16]


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class LatentCache:
    """The cache folder of one VAE: ``folder/latents/<key>.safetensors``, one file per image."""

    folder: Path
    vae_key: str

    @classmethod
    def for_vae(cls, folder: str | Path, vae) -> "LatentCache":
        return cls(Path(folder), vae_fingerprint(vae))

    def key(self, image: Path, size: tuple[int, int], flips: tuple[bool, ...]) -> str:
        """The file name (without suffix) of one image's cached latents."""
        parts = [FORMAT, file_digest(image), f"{size[0]}x{size[1]}", ",".join(map(str, flips)), self.vae_key]
        return hashlib.sha1("|".join(parts).encode()).hexdigest()[:24]

    def path(self, key: str) -> Path:
        return self.folder / "latents" / f"{key}.safetensors"

    def read(self, key: str, n_variants: int) -> list[dict[str, torch.Tensor]] | None:
        """The stored variants (``mean``, ``std``, ``time_ids`` each), or None when absent or unreadable."""
        from safetensors.torch import load_file

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            data = load_file(str(path))
            return [{k: data[f"{k}.{v}"] for k in ("mean", "std", "time_ids")} for v in range(n_variants)]
        except Exception:  # noqa: BLE001 - a damaged cache file is rebuilt, never fatal
            return None

    def write(self, key: str, variants: list[dict[str, torch.Tensor]], source: Path) -> Path:
        """Write one image's latents atomically (a killed run leaves no half file behind)."""
        from safetensors.torch import save_file

        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"{k}.{v}": t.detach().to("cpu", torch.float32).contiguous()
                   for v, d in enumerate(variants) for k, t in d.items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT, "source": Path(source).name})
        return path
