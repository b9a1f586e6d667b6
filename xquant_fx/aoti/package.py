"""The package format: its metadata and checksum manifest, reading and checking an archive
(:func:`read_metadata`, :func:`verify_package`, :func:`inspect_package`), and the JSON form of a config.
What capture and runtime share; imports neither."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile
from pathlib import Path

import torch

from ..config import MoESchedule, XQuantConfig

#: Version of the package layout written by :func:`export`; :func:`load` refuses others.
FORMAT_VERSION = 1
METADATA_FILE = "xquant_fx.json"
#: The checksum manifest (SHA-256 and size of every other member), beside the metadata.
MANIFEST_FILE = "xquant_fx_manifest.json"
DECODE, PREFILL = "decode", "prefill"
#: Top-level Triton kernels of :mod:`xquant_fx.kernels` whose launches :func:`inspect_package` looks for.
XQUANT_KERNELS = ("_append_token_kernel", "_attend_kernel", "_attend_merge_kernel")

_DTYPES = {str(dt): dt for dt in (torch.float16, torch.bfloat16, torch.float32, torch.int32, torch.int64,
                                   torch.float8_e4m3fn)}


class PackageError(ValueError):
    """A package that cannot be used as asked: not an xquant_fx package, another format version,
    another config/shape/device than requested, or a device this machine lacks."""


def config_to_dict(config: XQuantConfig) -> dict:
    """JSON form of an :class:`XQuantConfig` (eta keys as strings)."""
    d = dataclasses.asdict(config)
    d["eta"] = {str(k): v for k, v in config.eta.items()}
    for name in ("k_bits", "v_bits", "moe_top_k"):
        if isinstance(d[name], tuple):
            d[name] = list(d[name])
    if isinstance(config.moe_top_k, MoESchedule):  # a NamedTuple: asdict would make it a plain tuple
        d["moe_top_k"] = {"schedule": config.moe_top_k._asdict()}
    return d


def config_from_dict(d: dict) -> XQuantConfig:
    d = dict(d)
    d["eta"] = {int(k): v for k, v in d.get("eta", {}).items()}
    for name in ("k_bits", "v_bits", "moe_top_k"):
        if isinstance(d.get(name), list):
            d[name] = tuple(d[name])
    if isinstance(d.get("moe_top_k"), dict):
        d["moe_top_k"] = MoESchedule(**d["moe_top_k"]["schedule"])
    return XQuantConfig(**d)


def _resolve_config(config) -> XQuantConfig:
    config = XQuantConfig.coerce(config)
    if config.prunes_experts:
        raise ValueError(
            f"config {config.name!r} sets MoE options (moe_*), which export does not apply (the package runs "
            "the model's own routing); use optimize() for expert pruning, or drop the moe_* fields"
        )
    return config


def _token_ids(value) -> list[int]:
    if value is None:
        return []
    if torch.is_tensor(value):
        value = value.tolist()
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


# ---------------------------------------------------------------------------- integrity
_HASH_CHUNK = 1 << 22


def _member_digest(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path) -> str:
    """SHA-256 of one member's bytes; reading it to the end also checks its zip CRC-32."""
    digest = hashlib.sha256()
    try:
        with archive.open(info) as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise PackageError(f"{path} is damaged: member {info.filename!r} cannot be read intact ({err}); "
                           "the file was corrupted after export: copy or export it again") from None
    return digest.hexdigest()


def _add_manifest(path: str) -> None:
    """Append ``extra/xquant_fx_manifest.json`` (SHA-256 and size of every other member) to the
    archive at ``path``."""
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        root = _metadata_member(infos, path).rsplit("extra/", 1)[0]
        members = {info.filename: {"size": info.file_size, "sha256": _member_digest(archive, info, path)}
                   for info in infos}
    manifest = {"algorithm": "sha256", "members": members}
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(f"{root}extra/{MANIFEST_FILE}", json.dumps(manifest, indent=0))


def _metadata_member(infos, path) -> str:
    names = [i.filename for i in infos if i.filename.split("/", 1)[-1] == f"extra/{METADATA_FILE}"]
    if not names:
        raise PackageError(
            f"{path} is a .pt2 archive but not an xquant_fx package (no extra/{METADATA_FILE}); "
            "export it with xquant_fx.aoti"
        )
    return names[0]


def verify_package(path) -> dict:
    """Check a package against the checksum manifest :func:`export` wrote into it, reading every
    member once (no code of the package is loaded); returns the manifest.

    Raises :class:`PackageError` (a ``ValueError``) naming the first problem: a member whose bytes
    fail their zip CRC-32 or SHA-256, or whose size differs; a member the manifest does not list, a
    listed member that is missing, a name present twice; a package without a manifest (written
    before xquant_fx added them: re-export it, or ``load(..., verify=False)`` if you trust it).
    Checksums detect corruption (a bad disk, a truncated or altered copy), not malice: whoever can
    change the package can rewrite its manifest too (see :func:`load`, "Trust")."""
    path = _check_archive_path(path)
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        names = [i.filename for i in infos]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise PackageError(f"{path} holds the member(s) {twice[:3]} more than once: a damaged or altered "
                               "package (a loader could read either copy)")
        meta_name = _metadata_member(infos, path)
        manifest_name = meta_name.rsplit("/", 1)[0] + "/" + MANIFEST_FILE
        if manifest_name not in names:
            raise PackageError(
                f"{path} has no checksum manifest (extra/{MANIFEST_FILE}): it was written by an xquant_fx "
                "before packages carried one, or the manifest was removed. Export it again with this xquant_fx; "
                "if you trust this file as it is, load(path, verify=False) skips the check"
            )
        try:
            manifest = json.loads(archive.read(manifest_name).decode())
            listed = manifest["members"]
            if manifest.get("algorithm") != "sha256" or not isinstance(listed, dict):
                raise ValueError(f"algorithm {manifest.get('algorithm')!r}")
        except (zipfile.BadZipFile, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
            raise PackageError(f"{path} is damaged: its checksum manifest is unreadable ({err})") from None
        unlisted = [n for n in names if n != manifest_name and n not in listed]
        if unlisted:
            raise PackageError(f"{path} holds member {unlisted[0]!r}, which its checksum manifest does not list: "
                               "the package was changed after export")
        missing = sorted(set(listed) - set(names))
        if missing:
            raise PackageError(f"{path} lacks member {missing[0]!r}, which its checksum manifest lists: "
                               "the package was changed after export")
        for info in infos:
            if info.filename == manifest_name:
                continue
            want = listed[info.filename]
            if info.file_size != want.get("size"):
                raise PackageError(f"{path} is damaged: member {info.filename!r} has {info.file_size} bytes, "
                                   f"its checksum manifest says {want.get('size')}")
            if _member_digest(archive, info, path) != want.get("sha256"):
                raise PackageError(f"{path} is damaged: member {info.filename!r} does not match its SHA-256 in the "
                                   "checksum manifest; the file was corrupted or changed after export")
    return manifest


def _check_archive_path(path) -> Path:
    path = Path(os.fspath(path))
    if not path.exists():
        raise FileNotFoundError(f"no package at {path}")
    if not path.is_file():
        raise PackageError(f"{path} is not a file (an xquant_fx package is one .pt2 file)")
    if not zipfile.is_zipfile(path):
        raise PackageError(f"{path} is not an AOTInductor package (.pt2 archive): not a zip file")
    return path


def read_metadata(path) -> dict:
    """The metadata of an xquant_fx package, read from the archive without loading any model.

    Raises ``FileNotFoundError`` for a missing file and :class:`PackageError` for a file that is
    not an xquant_fx package."""
    path = _check_archive_path(path)
    with zipfile.ZipFile(path) as archive:
        name = _metadata_member(archive.infolist(), path)
        try:
            meta = json.loads(archive.read(name).decode())
        except (zipfile.BadZipFile, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise PackageError(f"{path}: unreadable xquant_fx metadata ({err})") from None
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise PackageError(
            f"{path} has package format {version!r}; this xquant_fx reads format {FORMAT_VERSION}: re-export it"
        )
    return meta


def inspect_package(path) -> dict:
    """What a package contains, from the archive alone: ``metadata``, and per model its files,
    the xquant Triton kernels its compiled code launches (``xquant_kernels``), the number of GPU
    kernel binaries (``kernel_binaries``) and whether it calls an ``xquant::`` op (``xquant_ops``)."""
    meta = read_metadata(path)
    models: dict[str, dict] = {}
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            parts = name.split("/")
            try:
                i = parts.index("aotinductor")
            except ValueError:
                continue
            if len(parts) < i + 3:
                continue
            model = models.setdefault(parts[i + 1], {"files": [], "xquant_kernels": set(), "kernel_binaries": 0,
                                                     "xquant_ops": set()})
            fname = parts[-1]
            model["files"].append(fname)
            if fname.endswith((".cubin", ".fatbin", ".hsaco", ".spv")):
                model["kernel_binaries"] += 1
            if fname.endswith((".cpp", ".json", ".h")):
                text = archive.read(name).decode(errors="ignore")
                model["xquant_kernels"].update(k for k in XQUANT_KERNELS if k in text)
                model["xquant_ops"].update(op for op in ("append_token", "attend", "read_keys", "read_values")
                                           if f"xquant::{op}" in text)
            if fname.endswith((".cubin", ".fatbin")):
                model["xquant_kernels"].update(k for k in XQUANT_KERNELS if k in fname)
    for model in models.values():
        model["xquant_kernels"] = sorted(model["xquant_kernels"])
        model["xquant_ops"] = sorted(model["xquant_ops"])
    return {"metadata": meta, "models": models}
