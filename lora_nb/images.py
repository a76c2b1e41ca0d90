"""Images: import a user's folder or zip safely, load any image robustly, audit a dataset.

Three jobs, used by notebook 01:

* :func:`import_images` copies a folder or a ``.zip`` of images into the
  workspace (``runs/<name>/source/``). The originals are only ever read. Every
  file that cannot be used is skipped and listed with its name and the reason
  in the :class:`ImportReport` -- an import never crashes on a bad file. Zips
  are read in memory with limits (no path traversal, no symlinks, no zip bombs).
* :func:`load_image` turns any image Pillow can read into a plain 8-bit RGB
  image: EXIF orientation applied, transparency flattened on a background
  colour, palette / CMYK / 16-bit / grayscale converted, decompression bombs
  refused before decoding.
* :func:`audit_images` measures what makes a good LoRA dataset (C4): size
  against the training resolution, blur, exact and near duplicates, variety.

Plus the kohya folder convention ``<repeats>_<concept>`` used by the trainer
(:func:`concept_folder_name`, :func:`parse_concept_folder`) and the
regularization set (C5).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import stat
import unicodedata
import warnings
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from lora_nb import LoraNbError
from lora_nb.fsutil import write_bytes_atomic
from lora_nb.folders import (  # noqa: F401 - the kohya folder names are re-exported for callers of images
    CAPTION_EXTENSIONS, IMAGE_EXTENSIONS, concept_folder_name, find_concept_folders, list_images,
    make_concept_folder, make_regularization_folder, parse_concept_folder)

# Defaults against decompression and zip bombs. 64 megapixels covers every camera
# photo a learner is likely to use (an 8000x8000 image); bigger is refused before decoding.
MAX_PIXELS = 64_000_000
MAX_FILE_BYTES = 200 * 1024 * 1024
MAX_ZIP_FILES = 10_000
MAX_ZIP_TOTAL_BYTES = 4 * 1024 * 1024 * 1024
MAX_ZIP_RATIO = 200
MIN_SIDE = 64
# Formats that can be copied byte for byte when nothing needs converting.
_COPYABLE_FORMATS = {"JPEG": (".jpg", ".jpeg"), "PNG": (".png",), "WEBP": (".webp",)}


# --------------------------------------------------------------------------- reports

@dataclass
class ImportedImage:
    """One image that made it into the workspace."""

    original: str          # name in the source folder / zip (relative path)
    path: str              # where it is now, inside dest_dir
    width: int
    height: int
    converted: bool        # True: re-encoded (rotation, alpha, CMYK, 16-bit ...); False: byte copy
    notes: list[str] = field(default_factory=list)


@dataclass
class SkippedFile:
    """A file that was not imported, and why."""

    name: str
    reason: str


@dataclass
class ImportReport:
    """What :func:`import_images` did: the images kept and every file skipped with its reason."""

    source: str
    dest_dir: str
    imported: list[ImportedImage] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)  # caption files written next to their imported image

    @property
    def paths(self) -> list[Path]:
        """Paths of the imported images in the workspace."""
        return [Path(i.path) for i in self.imported]

    def skipped_by_reason(self) -> dict[str, list[str]]:
        """``{reason: [names]}``: the skipped files grouped, for a short summary."""
        out: dict[str, list[str]] = {}
        for s in self.skipped:
            out.setdefault(s.reason, []).append(s.name)
        return out

    def skipped_names(self) -> dict[str, str]:
        """``{name: reason}`` for every skipped file."""
        return {s.name: s.reason for s in self.skipped}

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """A few lines for the notebook: counts, then each skipped file and its reason."""
        captions = f" with {len(self.captions)} caption file(s)" if self.captions else ""
        lines = [f"Imported {len(self.imported)} image(s){captions} from {self.source} into {self.dest_dir}; "
                 f"skipped {len(self.skipped)} file(s)."]
        converted = [i for i in self.imported if i.converted]
        if converted:
            lines.append(f"  {len(converted)} converted (rotation, transparency, colour mode or bit depth).")
        lines += [f"  skipped {s.name}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


# --------------------------------------------------------------------------- loading

def open_image(data: bytes | str | Path, name: str | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open an image (bytes or a path) lazily and refuse it if it has too many pixels.

    Only the header is read, so a decompression bomb (a small file that decodes
    to billions of pixels) is refused before any pixel is decoded. Raises
    :class:`LoraNbError` with the reason for anything that is not a readable image.
    """
    label = name or str(data if not isinstance(data, bytes) else "<bytes>")
    src = io.BytesIO(data) if isinstance(data, bytes) else str(data)
    try:
        with warnings.catch_warnings():
            # Pillow warns between its limit and twice it; escalate unless the caller allows more pixels.
            escalate = max_pixels <= (Image.MAX_IMAGE_PIXELS or max_pixels)
            warnings.simplefilter("error" if escalate else "ignore", Image.DecompressionBombWarning)
            img = Image.open(src)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise LoraNbError(
            f"{label}: too large to load safely (its header declares more pixels than Pillow's "
            f"decompression-bomb limit: a giant image or a malicious file). Downscale it first. [{exc}]"
        ) from None
    except Image.UnidentifiedImageError:
        raise LoraNbError(f"{label}: not an image file Pillow can read (unknown or corrupt format).") from None
    except Exception as exc:  # noqa: BLE001 - malformed files raise all sorts of errors inside Pillow
        raise LoraNbError(f"{label}: could not open the image ({type(exc).__name__}: {exc}).") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise LoraNbError(f"{label}: the image has no pixels ({w}x{h}).")
    if w * h > max_pixels:
        img.close()
        raise LoraNbError(
            f"{label}: too large to load safely ({w}x{h} = {w * h / 1e6:.0f} megapixels, the limit is "
            f"{max_pixels / 1e6:.0f}). Downscale it first, or raise max_pixels if you trust the file."
        )
    return img


def _to_uint8_gray(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float grayscale to 8-bit, scaled by the format's range."""
    arr = np.asarray(img)
    if arr.dtype.kind == "f":
        hi = 1.0 if arr.size and float(np.nanmax(arr)) <= 1.0 else 255.0
        out = np.clip(np.nan_to_num(arr) / hi * 255.0, 0, 255)
    else:
        arr = arr.astype(np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or (arr.size and arr.max() > 255) else 255.0
        out = np.clip(arr / hi * 255.0, 0, 255)
    return Image.fromarray(np.round(out).astype(np.uint8), mode="L")


def normalize_image(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> tuple[Image.Image, list[str]]:
    """Decode ``img`` and return it as 8-bit RGB plus notes on what was changed.

    EXIF orientation is applied; transparency (RGBA, LA, palette with a
    transparent colour) is composited on ``background``; CMYK, palette,
    16-bit and grayscale images become RGB. Animated images keep the first frame.
    """
    notes: list[str] = []
    if getattr(img, "n_frames", 1) > 1:
        notes.append(f"animated ({img.n_frames} frames): first frame kept")
        img.seek(0)
    img.load()
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block only costs the rotation
        orientation = 1
        notes.append("unreadable EXIF data ignored")
    if orientation not in (1, None):
        img = ImageOps.exif_transpose(img)
        notes.append(f"rotated by EXIF orientation {orientation}")
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        notes.append("palette image converted")
    elif mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        img = _to_uint8_gray(img)
        notes.append(f"{mode} (high bit depth) converted to 8 bit")
    elif mode == "CMYK":
        img = img.convert("RGB")
        notes.append("CMYK converted to RGB")
    elif mode == "1":
        img = img.convert("L")
        notes.append("1-bit image converted")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode in ("L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        alpha = np.asarray(rgba)[..., 3]
        if alpha.min() < 255:
            notes.append(f"transparency flattened on background {tuple(background)}")
        base = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        img = Image.alpha_composite(base, rgba).convert("RGB")
    elif img.mode == "L":
        img = img.convert("RGB")
        notes.append("grayscale")
    elif img.mode != "RGB":
        notes.append(f"{img.mode} converted to RGB")
        img = img.convert("RGB")
    return img, notes


def image_size(path: str | Path, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """``(width, height)`` as :func:`load_image` will return it (EXIF rotation applied), from the header only."""
    img = open_image(path, str(path), max_pixels)
    with img:
        w, h = img.size
        try:
            orientation = img.getexif().get(0x0112, 1)
        except Exception:  # noqa: BLE001 - a broken EXIF block only costs the rotation, as in normalize_image
            orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def load_image(path: str | Path | bytes, background: tuple[int, int, int] = (255, 255, 255),
               max_pixels: int = MAX_PIXELS, name: str | None = None) -> Image.Image:
    """Load any readable image as 8-bit RGB (see :func:`normalize_image`).

    Raises :class:`LoraNbError` naming the file and the reason when the file is
    not an image, is truncated or corrupt, or is too large to decode safely.
    """
    label = name or (str(path) if not isinstance(path, bytes) else "<bytes>")
    img = open_image(path, label, max_pixels)
    try:
        with img:
            out, _ = normalize_image(img, background)
            return out
    except LoraNbError:
        raise
    except Exception as exc:  # noqa: BLE001 - a bad file must never crash the caller
        raise LoraNbError(f"{label}: the image is truncated or corrupt ({type(exc).__name__}: {exc}).") from None


# --------------------------------------------------------------------------- import

def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write through a temporary file and rename (a full disk gives a clear error, the old file stays)."""

    write_bytes_atomic(path, data)


def atomic_save_image(img: Image.Image, path: str | Path, **save_kwargs) -> Path:
    """Save ``img`` to ``path`` through a temporary file, so an interrupted save leaves no half file."""
    path = Path(path)
    buf = io.BytesIO()
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}.get(path.suffix.lower(), None)
    img.save(buf, format=fmt, **save_kwargs)
    _atomic_write_bytes(path, buf.getvalue())
    return path


def safe_file_name(name: str) -> str:
    """A file name that is safe in any folder: no separators, control characters or leading dots.

    Spaces and non-ASCII letters are kept (they work everywhere this course runs).
    """
    name = unicodedata.normalize("NFC", name.replace("\\", "/").split("/")[-1])
    name = "".join("_" if (unicodedata.category(c).startswith("C") or c in '<>:"|?*') else c for c in name)
    name = name.strip().lstrip(".") or "image"
    stem, ext = os.path.splitext(name)
    return stem[:150] + ext[:10]


def _unique_path(dest: Path, name: str, taken: set[str], data: bytes | None = None) -> tuple[Path, bool]:
    """A free name in ``dest`` (``name``, ``name-1`` ...) and whether it already holds exactly ``data``."""
    stem, ext = os.path.splitext(name)
    candidate, n = name, 1
    while True:
        if candidate.lower() not in taken:
            path = dest / candidate
            if not path.exists():
                break
            if data is not None and path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
                taken.add(candidate.lower())
                return path, True
        candidate = f"{stem}-{n}{ext}"
        n += 1
    taken.add(candidate.lower())
    return dest / candidate, False


def pixel_hash(img: Image.Image) -> str:
    """SHA-256 of the decoded RGB pixels and size: equal for the same picture in any file format."""
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    h = hashlib.sha256(f"{rgb.size}".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


HIDDEN_FILE_REASON = ("hidden (its name or folder starts with '.'): not imported; rename it without the leading dot "
                      "to import it")
HIDDEN_FOLDER_REASON = "hidden folder (its name starts with '.'): not looked into"


def _iter_folder(folder: Path):
    """Yield ``(relative name, bytes or None, skip reason or None)`` for each file in a folder."""
    for root, dirs, files in os.walk(folder, followlinks=False):
        for d in sorted(d for d in dirs if d.startswith(".")):
            yield (Path(root) / d).relative_to(folder).as_posix() + "/", None, HIDDEN_FOLDER_REASON
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            p = Path(root) / f
            rel = p.relative_to(folder).as_posix()
            if f.startswith("."):
                yield rel, None, HIDDEN_FILE_REASON
                continue
            if p.is_symlink():
                yield rel, None, "symbolic link (not followed, for safety): copy the real file into the folder"
                continue
            try:
                st = p.lstat()
                if not stat.S_ISREG(st.st_mode):
                    yield rel, None, "not a regular file (device, pipe or socket)"
                    continue
                size = st.st_size
                if size > MAX_FILE_BYTES:
                    yield rel, None, f"file too large ({size / 1e6:.0f} MB > {MAX_FILE_BYTES / 1e6:.0f} MB)"
                    continue
                yield rel, p.read_bytes(), None
            except OSError as exc:
                yield rel, None, f"could not read the file ({exc.strerror or exc})"


def check_zip(zf: zipfile.ZipFile, zip_name: str, max_files: int = MAX_ZIP_FILES,
              max_total_bytes: int = MAX_ZIP_TOTAL_BYTES, max_ratio: int = MAX_ZIP_RATIO) -> None:
    """Refuse a zip with unsafe entries (absolute paths, ``..``) or bomb-like sizes.

    Raises :class:`LoraNbError` naming the zip and the offending entry. The
    declared sizes are checked here; the actual bytes are counted again while
    reading (:func:`_iter_zip`), so a zip that lies in its headers is caught too.
    """
    infos = zf.infolist()
    if len(infos) > max_files:
        raise LoraNbError(
            f"{zip_name}: refused, it holds {len(infos)} entries (limit {max_files}). "
            "Split it into smaller zips or import the unpacked folder."
        )
    total = 0
    for info in infos:
        name = info.filename.replace("\\", "/")
        parts = name.split("/")
        if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in parts:
            raise LoraNbError(
                f"{zip_name}: refused, the entry {info.filename!r} points outside the folder it would be "
                "unpacked into (path traversal, 'zip slip'). Re-create the zip from a plain folder."
            )
        total += info.file_size
        if (info.compress_size > 0 and info.file_size > 1_000_000 and info.file_size / info.compress_size > max_ratio
                and not _fits_as_image(zf, info)):
            raise LoraNbError(
                f"{zip_name}: refused, the entry {info.filename!r} expands {info.file_size / info.compress_size:.0f}x "
                f"(limit {max_ratio}x), which is how zip bombs work. If it is a genuine uncompressed image "
                "(BMP/TIFF), convert it to PNG or JPEG before zipping."
            )
    if total > max_total_bytes:
        raise LoraNbError(
            f"{zip_name}: refused, it unpacks to {total / 1e9:.1f} GB (limit {max_total_bytes / 1e9:.1f} GB)."
        )


def _fits_as_image(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bool:
    """Whether a highly compressed zip entry is an image within the pixel limit whose file is no larger than
    such an image can be (a solid-colour photo or BMP compresses thousands of times and is harmless): only
    the first MiB is read, for the header."""
    try:
        with zf.open(info) as f:
            head = f.read(1 << 20)
        with Image.open(io.BytesIO(head)) as img:
            w, h = img.size
    except Exception:  # noqa: BLE001 - not an image header: the ratio rule applies
        return False
    return w * h <= MAX_PIXELS and info.file_size <= 4 * w * h + 1_000_000


def _zip_is_symlink(info: zipfile.ZipInfo) -> bool:
    return info.create_system == 3 and stat.S_ISLNK(info.external_attr >> 16)


def _iter_zip(zip_path: Path, max_files: int, max_total_bytes: int, max_ratio: int):
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise LoraNbError(f"{zip_path}: not a readable zip file ({exc}).") from None
    with zf:
        check_zip(zf, zip_path.name, max_files, max_total_bytes, max_ratio)
        read_total = 0
        for info in zf.infolist():
            name = info.filename
            if info.is_dir():
                continue
            if name.startswith("__MACOSX/"):
                yield name, None, "macOS metadata inside the zip (__MACOSX), not a picture"
                continue
            if any(part.startswith(".") for part in name.split("/")):
                yield name, None, HIDDEN_FILE_REASON
                continue
            if _zip_is_symlink(info):
                yield name, None, "symbolic link inside the zip (not followed, for safety)"
                continue
            if info.flag_bits & 0x1:
                yield name, None, "encrypted zip entry: unzip it with its password first"
                continue
            if info.file_size > MAX_FILE_BYTES:
                yield name, None, f"file too large ({info.file_size / 1e6:.0f} MB > {MAX_FILE_BYTES / 1e6:.0f} MB)"
                continue
            try:
                with zf.open(info) as f:
                    data = f.read(MAX_FILE_BYTES + 1)
            except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError) as exc:
                yield name, None, f"corrupt zip entry ({exc})"
                continue
            if len(data) > MAX_FILE_BYTES:
                yield name, None, "file larger than its zip header says: refused"
                continue
            read_total += len(data)
            if read_total > max_total_bytes:
                raise LoraNbError(f"{zip_path.name}: refused, it unpacks to more than {max_total_bytes / 1e9:.1f} GB.")
            yield name, data, None


def _decode_for_import(data: bytes, name: str, background, max_pixels: int, min_side: int):
    """Decode bytes into (RGB image, source format, exif orientation, notes); raise LoraNbError with a reason."""
    img = open_image(data, name, max_pixels)
    fmt = img.format
    try:
        with img:
            rgb, notes = normalize_image(img, background)
    except Exception as exc:  # noqa: BLE001 - a bad file must never crash the import
        raise LoraNbError(f"{name}: the image is truncated or corrupt ({type(exc).__name__}: {exc}).") from None
    w, h = rgb.size
    if min(w, h) < min_side:
        raise LoraNbError(f"{name}: too small to train on ({w}x{h}; the shortest side must be at least {min_side} px).")
    return rgb, fmt, notes


def import_images(src: str | Path, dest_dir: str | Path, background: tuple[int, int, int] = (255, 255, 255),
                  max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE, skip_duplicates: bool = True,
                  max_zip_files: int = MAX_ZIP_FILES, max_zip_bytes: int = MAX_ZIP_TOTAL_BYTES,
                  max_zip_ratio: int = MAX_ZIP_RATIO, progress: bool = True) -> ImportReport:
    """Import a folder or ``.zip`` of images into ``dest_dir`` without touching the originals.

    Every file is read, never written. A usable image that needs no conversion
    (an RGB/grayscale JPEG, PNG or WebP without EXIF rotation or transparency)
    is copied byte for byte; any other usable image is written normalised to
    RGB (EXIF rotation applied, transparency flattened on ``background``,
    CMYK/palette/16-bit converted). Files that are not images, corrupt,
    truncated, too large (more than ``max_pixels``), too small (shortest side
    under ``min_side``) or exact pixel duplicates of an earlier image (when
    ``skip_duplicates``) are skipped and listed in the report with the reason.
    Converted JPEG photos are re-encoded as JPEG (quality 95), others as PNG.
    Sub-folders are flattened into ``dest_dir``; names keep spaces and non-ASCII
    letters and get a ``-1`` suffix on collision.

    A zip is read in memory, never unpacked by path: entries with absolute
    paths or ``..`` are refused (zip slip), symlink entries are skipped, and
    zips over ``max_zip_files`` entries, ``max_zip_bytes`` unpacked or with an
    entry expanding more than ``max_zip_ratio`` times are refused (zip bombs), unless
    that entry's header shows an image within ``max_pixels`` no larger than such an
    image can be (a solid-colour photo compresses that well and is harmless).
    Refusals raise :class:`LoraNbError`; bad files never do.
    """
    from tqdm.auto import tqdm

    src, dest = Path(src).expanduser(), Path(dest_dir).expanduser()
    entries, total = _entries_of(src, dest, max_zip_files, max_zip_bytes, max_zip_ratio)
    dest.mkdir(parents=True, exist_ok=True)
    report = ImportReport(source=str(src), dest_dir=str(dest))
    taken: set[str] = set()
    seen_hashes: dict[str, str] = {}
    captions: dict[str, tuple[str, bytes]] = {}  # source name without extension → (source name, text)
    for raw, data, reason in tqdm(entries, total=total, desc="importing", unit="file", disable=not progress):
        name = printable_name(raw)  # what the report says; the new file's name is made from the original
        if reason is not None:
            report.skipped.append(SkippedFile(name, reason))
            continue
        if os.path.splitext(name)[1].lower() in CAPTION_EXTENSIONS:
            captions[os.path.splitext(name)[0]] = (name, data)
            continue
        try:
            rgb, fmt, notes = _decode_for_import(data, name, background, max_pixels, min_side)
        except LoraNbError as exc:
            report.skipped.append(SkippedFile(name, str(exc).split(": ", 1)[-1]))
            continue
        digest = pixel_hash(rgb)
        if skip_duplicates and digest in seen_hashes:
            report.skipped.append(SkippedFile(name, f"duplicate: same pixels as {seen_hashes[digest]}"))
            continue
        seen_hashes[digest] = name
        base = safe_file_name(raw)
        stem, ext = os.path.splitext(base)
        changed = [n for n in notes if n != "grayscale"]
        copy_as_is = fmt in _COPYABLE_FORMATS and not changed and ext.lower() in _COPYABLE_FORMATS[fmt]
        if copy_as_is:
            out_name = base
        else:  # photos stay JPEG (a 24 MP phone photo as PNG is ~50 MB); everything else becomes PNG
            as_jpeg = fmt in ("JPEG", "MPO")
            out_name = stem + (".jpg" if as_jpeg else ".png")
            buf = io.BytesIO()
            if as_jpeg:
                rgb.save(buf, format="JPEG", quality=95, subsampling=0)
            else:
                rgb.save(buf, format="PNG", compress_level=4)
            data = buf.getvalue()
        target, already_there = _unique_path(dest, out_name, taken, data)
        if not already_there:  # importing the same files again is a no-op
            _atomic_write_bytes(target, data)
        report.imported.append(ImportedImage(name, str(target), rgb.width, rgb.height, not copy_as_is, notes))
    _import_captions(report, captions)
    return report


def printable_name(name: str) -> str:
    """A file name as text that can be printed and written to JSON: bytes that are not UTF-8 (which Python
    keeps as surrogates) become ``\\xNN`` escapes, so ``caf\\xe9.png`` is reported instead of failing."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _entries_of(src: Path, dest: Path, max_zip_files: int, max_zip_bytes: int, max_zip_ratio: int):
    """``(entries, count or None)`` of a folder or zip to import; refuses a missing source or a destination inside it."""
    if not src.exists():
        raise LoraNbError(f"{src} does not exist: pass a folder of images or a .zip file.")
    if src.is_dir():
        if dest.resolve() == src.resolve() or src.resolve() in dest.resolve().parents:
            raise LoraNbError(f"dest_dir {dest} is inside the source folder {src}: choose a folder outside it.")
        return _iter_folder(src), sum(len(files) for _, _, files in os.walk(src, followlinks=False))
    if not src.is_file():  # a pipe, socket or device: reading it could block forever
        raise LoraNbError(f"{src} is not a regular file (a pipe, socket or device): pass a folder of images or a "
                          ".zip file.")
    if src.suffix.lower() == ".zip" or zipfile.is_zipfile(src):
        return _iter_zip(src, max_zip_files, max_zip_bytes, max_zip_ratio), None
    raise LoraNbError(f"{src} is neither a folder nor a .zip file: pass the folder that holds your images.")


def _import_captions(report: ImportReport, captions: dict[str, tuple[str, bytes]]) -> None:
    """Write each caption file next to the image it belongs to (same stem), under that image's new name; a caption
    already in the workspace is kept (it may hold your edits); a caption without an image is listed as skipped."""
    used = set()
    for img in report.imported:
        key = os.path.splitext(img.original)[0]
        if key not in captions:
            continue
        used.add(key)
        name, data = captions[key]
        target = Path(img.path).with_suffix(os.path.splitext(name)[1].lower())
        if target.exists() and target.read_bytes() != data:
            report.skipped.append(SkippedFile(name, f"caption kept: {target.name} already in the workspace differs "
                                                    "(your edits are not overwritten)"))
            continue
        if not target.exists():
            _atomic_write_bytes(target, data)
        report.captions.append(str(target))
    for key, (name, _) in sorted(captions.items()):
        if key not in used:
            report.skipped.append(SkippedFile(name, "not an image: a caption file with no imported image of the same name"))


# --------------------------------------------------------------------------- audit

@dataclass
class ImageAudit:
    """Measurements of one image."""

    path: str
    width: int
    height: int
    upscale: float           # how much the image must be enlarged to cover the target size (1.0 = none)
    sharpness: float         # variance of the Laplacian at a standard size; low = blurry
    blurry: bool
    pixel_hash: str
    phash: str               # 64-bit perceptual hash as 16 hex digits
    warnings: list[str] = field(default_factory=list)


@dataclass
class AuditReport:
    """The dataset audit (C4): per image, and overall with warnings a learner can act on."""

    target: tuple[int, int]
    images: list[ImageAudit]
    exact_duplicates: list[list[str]]            # groups of paths with identical pixels
    near_duplicates: list[tuple[str, str, int]]  # (path a, path b, Hamming distance of the perceptual hashes)
    variety: float                               # 0 = all alike ... ~1 = unrelated pictures
    unreadable: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target"] = list(self.target)
        d["near_duplicates"] = [list(t) for t in self.near_duplicates]
        d["count"] = len(self.images)
        return d

    def save_json(self, path: str | Path) -> Path:
        """Write the report as JSON (atomically), e.g. ``dataset_report.json`` in the workspace."""
        path = Path(path)
        _atomic_write_bytes(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False).encode("utf-8"))
        return path

    def summary(self) -> str:
        lines = [f"{len(self.images)} image(s) audited against {self.target[0]}x{self.target[1]}; "
                 f"variety {self.variety:.2f}."]
        lines += [f"  ! {w}" for w in self.warnings]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def laplacian_variance(img: Image.Image, size: int = 512) -> float:
    """Sharpness: variance of the Laplacian of the grayscale image, resized so its long side is ``size``.

    Shrinking large images first makes the number comparable between images of
    different resolutions; smaller images are measured as they are (enlarging
    them would add blur of its own). Around 100 or less usually means a blurry
    or very flat picture.
    """
    import cv2

    gray = np.asarray(img.convert("L"))
    h, w = gray.shape
    scale = size / max(h, w)
    if scale < 1:  # only shrink: enlarging would blur the picture by itself (small size is its own warning)
        gray = cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return float(cv2.Laplacian(gray, cv2.CV_64F).var())


def perceptual_hash(img: Image.Image, hash_size: int = 8) -> int:
    """pHash: signs of the low-frequency DCT coefficients of a 32x32 grayscale thumbnail, as an int.

    Resized, recompressed or slightly edited copies of a picture have hashes a
    few bits apart; unrelated pictures differ in about half of the 64 bits.
    """
    import cv2

    small = np.asarray(img.convert("L").resize((hash_size * 4, hash_size * 4), Image.Resampling.LANCZOS), dtype=np.float32)
    low = cv2.dct(small)[:hash_size, :hash_size].flatten()
    bits = low[1:] > np.median(low[1:])
    bits = np.concatenate([[low[0] > 0], bits])
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two hashes."""
    return bin(a ^ b).count("1")


def upscale_needed(width: int, height: int, target: tuple[int, int]) -> float:
    """Factor by which an image must be enlarged to cover ``target`` (w, h) with a crop; 1.0 = none."""
    return max(1.0, target[0] / width, target[1] / height)


def variety_score(hashes: list[int]) -> float:
    """Mean pairwise perceptual-hash distance, scaled so unrelated pictures score about 1 (C4).

    0 means every picture looks alike (same shot, same framing). Cheap and
    coarse: it sees composition and light, not identity.
    """
    if len(hashes) < 2:
        return 0.0
    dists = [hamming(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1:]]
    return float(min(1.0, np.mean(dists) / 32.0))


def audit_images(paths, target: tuple[int, int] = (512, 512), blur_threshold: float = 100.0,
                 near_duplicate_distance: int = 6, low_variety: float = 0.5,
                 background: tuple[int, int, int] = (255, 255, 255), progress: bool = True) -> AuditReport:
    """Audit a dataset (C4): resolution against ``target``, blur, exact and near duplicates, variety.

    ``paths`` is a list of image paths or a folder. Returns an :class:`AuditReport`
    whose ``warnings`` say what to fix; unreadable files are listed, not raised.
    """
    from tqdm.auto import tqdm

    if isinstance(paths, (str, Path)) and Path(paths).is_dir():
        paths = list_images(paths)
    paths = [Path(p) for p in paths]
    if not paths:
        raise LoraNbError("audit_images got no images: import some first (import_images) or check the folder.")
    audits: list[ImageAudit] = []
    hashes: list[int] = []
    unreadable: dict[str, str] = {}
    for p in tqdm(paths, desc="auditing", unit="img", disable=not progress):
        try:
            img = load_image(p, background)
        except LoraNbError as exc:
            unreadable[str(p)] = str(exc)
            continue
        sharp = laplacian_variance(img)
        ph = perceptual_hash(img)
        up = upscale_needed(img.width, img.height, target)
        a = ImageAudit(str(p), img.width, img.height, round(up, 3), round(sharp, 1), sharp < blur_threshold,
                       pixel_hash(img), f"{ph:016x}")
        if up > 1.0:
            a.warnings.append(f"smaller than {target[0]}x{target[1]}: would be enlarged {up:.2f}x (soft details)")
        if a.blurry:
            a.warnings.append(f"blurry (sharpness {sharp:.0f} < {blur_threshold:.0f})")
        audits.append(a)
        hashes.append(ph)
    groups: dict[str, list[str]] = {}
    for a in audits:
        groups.setdefault(a.pixel_hash, []).append(a.path)
    exact = [g for g in groups.values() if len(g) > 1]
    exact_pairs = {(x, y) for g in exact for i, x in enumerate(g) for y in g[i + 1:]}
    near = []
    for i in range(len(audits)):
        for j in range(i + 1, len(audits)):
            d = hamming(hashes[i], hashes[j])
            if d <= near_duplicate_distance and (audits[i].path, audits[j].path) not in exact_pairs:
                near.append((audits[i].path, audits[j].path, d))
    variety = variety_score(hashes)
    report = AuditReport(tuple(target), audits, exact, near, round(variety, 3), unreadable)
    report.warnings = _overall_warnings(report, low_variety)
    return report


def _overall_warnings(r: AuditReport, low_variety: float) -> list[str]:
    out = []
    n = len(r.images)
    small = [a for a in r.images if a.upscale > 1.0]
    blurry = [a for a in r.images if a.blurry]
    if n < 5:
        out.append(f"only {n} usable image(s): 15-50 varied images give a much better LoRA")
    if small:
        out.append(f"{len(small)} image(s) smaller than the {r.target[0]}x{r.target[1]} target will be enlarged: "
                   "use higher-resolution sources or a smaller target")
    if blurry:
        out.append(f"{len(blurry)} blurry image(s): " + ", ".join(Path(a.path).name for a in blurry[:5])
                   + " -- the LoRA learns the blur too; replace or remove them")
    for g in r.exact_duplicates:
        out.append("exact duplicates: " + ", ".join(Path(p).name for p in g) + " -- keep one")
    for a, b, d in r.near_duplicates:
        out.append(f"near duplicates ({d} bits apart): {Path(a).name}, {Path(b).name} -- the pose/shot is over-weighted")
    if n >= 2 and r.variety < low_variety:
        out.append(f"low variety ({r.variety:.2f} < {low_variety}): add other angles, poses, lighting and backgrounds")
    for p, why in r.unreadable.items():
        out.append(f"unreadable: {why}")
    return out


# --------------------------------------------------------------------------- kohya folders
# (the convention itself lives in lora_nb.folders; its names are importable from here too)


def regularization_advice(n_regularization: int, n_training: int, toy: bool = False) -> list[str]:
    """Warnings about the size of a regularization set (C5: about 10-20 images recommended). The toy preset
    pairs a class picture with each of its pictures on purpose: ``toy`` says so instead of warning."""
    out = []
    if n_regularization == 0:
        return ["no regularization images: optional, but 10-20 images of the same class in other variations "
                "help the LoRA generalise"]
    if toy and n_regularization > 20:
        return [f"{n_regularization} class pictures, more than the 10-20 advised for a real subject: the toy preset "
                "pairs one with each of its pictures, and without them the zorb leaks into plain circles "
                "(docs/toy-world.md)"]
    if n_regularization < 10:
        out.append(f"{n_regularization} regularization image(s): 10-20 are recommended")
    if n_regularization > 20:
        out.append(f"{n_regularization} regularization images: more than about 20 and the LoRA starts learning "
                   "them instead of your subject")
    if n_training and n_regularization > n_training:
        out.append(f"more regularization images ({n_regularization}) than training images ({n_training})")
    return out


def copy_images(paths, dest_dir: str | Path) -> list[Path]:
    """Copy image files into ``dest_dir`` (byte copies, unique names); returns the new paths."""
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    taken = {p.name.lower() for p in dest.iterdir()}
    out = []
    for p in paths:
        target, _ = _unique_path(dest, safe_file_name(Path(p).name), taken)
        shutil.copyfile(p, target)
        out.append(target)
    return out


def write_awkward_examples(folder: str | Path) -> dict[str, str]:
    """Write a few awkward files into ``folder`` (a demo of what :func:`import_images` copes with).

    Returns ``{file name: what is awkward about it}``: CMYK, 16-bit, transparency,
    EXIF rotation, a palette GIF, a 20x20 icon, a truncated JPEG, a text file
    and an exact duplicate. Small and fast (a fraction of a second).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:160, 0:240]
    photo = np.stack([xx * 255 // 239, yy * 255 // 159, 255 - xx * 255 // 239], -1).astype(np.uint8)
    photo[40:120, 80:160] = (230, 60, 40)
    base = Image.fromarray(photo)
    base.save(folder / "ok.jpg", quality=92)
    base.convert("CMYK").save(folder / "cmyk.jpg", quality=92)
    Image.fromarray((np.asarray(base.convert("L"), np.uint16) * 257)).save(folder / "gray 16-bit.png")
    rgba = np.zeros((120, 120, 4), np.uint8)
    rgba[30:90, 30:90] = (40, 90, 220, 255)
    Image.fromarray(rgba, "RGBA").save(folder / "transparent.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees": phones store photos sideways and set this tag
    base.save(folder / "phone photo (EXIF rotated).jpg", exif=exif.tobytes(), quality=92)
    base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(folder / "palette.gif")
    Image.new("RGB", (20, 20), (10, 200, 30)).save(folder / "icon 20x20.png")
    buf = io.BytesIO()
    base.save(buf, "JPEG", quality=95)
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "notes.txt").write_text("remember: more angles\n", encoding="utf-8")
    (folder / "ok_copy.jpg").write_bytes((folder / "ok.jpg").read_bytes())
    return {
        "ok.jpg": "a plain JPEG (copied byte for byte)",
        "cmyk.jpg": "CMYK colours (print format)",
        "gray 16-bit.png": "16 bits per pixel, grayscale",
        "transparent.png": "transparent background",
        "phone photo (EXIF rotated).jpg": "stored sideways, with an EXIF rotation tag",
        "palette.gif": "a palette (GIF) image",
        "icon 20x20.png": "far too small",
        "truncated.jpg": "a download that stopped half way",
        "notes.txt": "not an image",
        "ok_copy.jpg": "the same picture twice",
    }


def contact_sheet(images, cols: int = 10, cell: int = 96, labels: list[str] | None = None,
                  background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Thumbnails of ``images`` (PIL images or paths) in a grid, each scaled to fit ``cell`` px (small ones enlarged
    with sharp pixels), with an optional label under each. Returns a PIL image to display."""
    from PIL import ImageDraw

    imgs = [im if isinstance(im, Image.Image) else load_image(im) for im in images]
    if not imgs:
        raise LoraNbError("contact_sheet got no images.")
    cols = max(1, min(cols, len(imgs)))
    rows = -(-len(imgs) // cols)
    import textwrap

    # labels wrap onto as many lines as the longest needs (none is cut): about 6 px per character
    wrapped = [textwrap.wrap(str(t), max(4, cell // 6), break_long_words=True) or [""] for t in labels or []]
    text_h = 12 * max((len(w) for w in wrapped), default=0)
    sheet = Image.new("RGB", (cols * (cell + 4) + 4, rows * (cell + text_h + 4) + 4), background)
    draw = ImageDraw.Draw(sheet)
    for i, im in enumerate(imgs):
        r, c = divmod(i, cols)
        scale = cell / max(im.size)
        resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.LANCZOS
        th = im.convert("RGB").resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), resample)
        x, y = 4 + c * (cell + 4), 4 + r * (cell + text_h + 4)
        sheet.paste(th, (x + (cell - th.width) // 2, y + (cell - th.height) // 2))
        for k, line in enumerate(wrapped[i] if labels else []):
            draw.text((x, y + cell + 1 + 12 * k), line, fill=(60, 60, 60))
    return sheet
