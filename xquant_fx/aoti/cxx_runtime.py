"""The C++ runtime check of a CUDA package before it is loaded (:func:`check_cxx_runtime`; the
reasons are in :func:`xquant_fx.aoti.load`'s docstring): ELF symbol tables, the dynamic linker,
and a trial load in a child process where those cannot answer."""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

from .package import MANIFEST_FILE, PackageError, read_metadata

logger = logging.getLogger(__name__)


_SHT_DYNSYM, _SHT_VERNEED, _SHT_VERSYM = 11, 0x6FFFFFFE, 0x6FFFFFFF
_PRELOAD_FIX = "LD_PRELOAD=$(readlink -f $(g++ -print-file-name=libstdc++.so.6))"


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text))


def _elf_cxx_imports(data: bytes) -> tuple[list[str], tuple[int, ...] | None]:
    """The undefined dynamic symbols an ELF64 little-endian shared object takes from libstdc++ (by
    their symbol versions), and the highest ``GLIBCXX`` version it needs. Reads the tables only;
    raises ``ValueError`` (or ``struct.error``) for what it cannot parse."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    # (name, type, flags, addr, offset, size, link, info, addralign, entsize)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]

    def table(index: int) -> bytes:
        return data[sections[index][4] : sections[index][4] + sections[index][5]]

    def cstr(strings: bytes, at: int) -> str:
        return strings[at : strings.index(b"\0", at)].decode(errors="replace")

    by_type = {}
    for sec in sections:
        by_type.setdefault(sec[1], sec)
    dynsym = by_type.get(_SHT_DYNSYM)
    if dynsym is None:
        raise ValueError("no dynamic symbol table")
    versym, verneed = by_type.get(_SHT_VERSYM), by_type.get(_SHT_VERNEED)
    cxx_versions: dict[int, str] = {}  # version index -> "GLIBCXX_3.4.21" / "CXXABI_1.3" of libstdc++
    if verneed is not None:
        strings, offset = table(verneed[6]), verneed[4]
        for _ in range(verneed[7]):
            _, count, file_at, aux_at, next_at = struct.unpack_from("<HHIII", data, offset)
            aux = offset + aux_at
            for _ in range(count):
                _, _, index, name_at, aux_next = struct.unpack_from("<IHHII", data, aux)
                if cstr(strings, file_at).startswith("libstdc++"):
                    cxx_versions[index] = cstr(strings, name_at)
                aux += aux_next
            if not next_at:
                break
            offset += next_at
    names = table(dynsym[6])
    symbols = []
    for i in range(1, dynsym[5] // 24):
        name_at, _, _, shndx, _, _ = struct.unpack_from("<IBBHQQ", data, dynsym[4] + 24 * i)
        if shndx != 0 or not name_at or versym is None:
            continue
        if struct.unpack_from("<H", data, versym[4] + 2 * i)[0] & 0x7FFF in cxx_versions:
            symbols.append(cstr(names, name_at))
    needed = max((_version_tuple(v) for v in cxx_versions.values() if v.startswith("GLIBCXX_")), default=None)
    return symbols, needed


_GLIBCXX_CACHE: dict[str, tuple[int, ...] | None] = {}


def _glibcxx_of(library: str) -> tuple[int, ...] | None:
    """The highest ``GLIBCXX_x.y.z`` version a libstdc++ file defines (read from its bytes)."""
    if library not in _GLIBCXX_CACHE:
        try:
            data = Path(library).read_bytes()
        except OSError:
            _GLIBCXX_CACHE[library] = None
        else:
            found = [_version_tuple(m.decode()) for m in re.findall(rb"GLIBCXX_\d+\.\d+(?:\.\d+)?(?=\x00)", data)]
            _GLIBCXX_CACHE[library] = max(found, default=None)
    return _GLIBCXX_CACHE[library]


def _dotted(version) -> str:
    return ".".join(map(str, version)) if version else "?"


def _compiler_cxx_runtime() -> dict | None:
    """The C++ runtime Inductor's compiler links against (recorded at export; names the fix)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        cxx = get_cpp_compiler()
        out = subprocess.run([cxx, "-print-file-name=libstdc++.so.6"], capture_output=True, text=True,
                             timeout=60).stdout.strip()
    except Exception:  # noqa: BLE001 - no compiler here: nothing to record
        return None
    if not os.path.isabs(out) or not os.path.exists(out):
        return {"compiler": cxx, "library": None, "glibcxx": None}
    library = os.path.realpath(out)
    return {"compiler": cxx, "library": library, "glibcxx": _dotted(_glibcxx_of(library))}


def _mapped_cxx_runtimes() -> list[str] | None:
    """The libstdc++ files mapped into this process (``None`` where ``/proc/self/maps`` is absent)."""
    try:
        text = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    found = set()
    for line in text.splitlines():
        fields = line.split(None, 5)
        if len(fields) == 6 and os.path.basename(fields[5].strip()).startswith("libstdc++.so"):
            found.add(os.path.realpath(fields[5].strip()))
    return sorted(found)


#: Where :func:`_symbol_providers` looks for ``dlsym`` / ``dladdr``, in order (an interpreter
#: linked without exporting them leaves the first without either).
_DL_LIBRARIES = (None, "libc.so.6", "libdl.so.2")


def _symbol_providers(symbols) -> dict[str, str] | None:
    """``symbol -> library`` for each symbol the dynamic linker's default scope (the process's
    global symbols) already defines; symbols it does not define are left out (a package's ``.so``
    then binds them to its own ``libstdc++`` dependency). ``None`` without ``dlsym``/``dladdr``."""
    import ctypes

    class _DlInfo(ctypes.Structure):
        _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                    ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]

    dlsym = dladdr = None
    for name in _DL_LIBRARIES:  # the process's global scope, else the C library (glibc >= 2.34), else libdl
        try:
            library = ctypes.CDLL(name)
            dlsym, dladdr = library.dlsym, library.dladdr
            break
        except (OSError, AttributeError):
            continue
    if dlsym is None:
        return None
    dlsym.argtypes, dlsym.restype = [ctypes.c_void_p, ctypes.c_char_p], ctypes.c_void_p
    dladdr.argtypes, dladdr.restype = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)], ctypes.c_int
    providers = {}
    for name in symbols:
        address = dlsym(None, name.encode())  # RTLD_DEFAULT
        info = _DlInfo()
        if address and dladdr(address, ctypes.byref(info)) and info.dli_fname:
            providers[name] = os.path.realpath(info.dli_fname.decode(errors="replace"))
    return providers


def _preload_hint(meta: dict | None) -> str:
    local = _compiler_cxx_runtime() or {}
    library = local.get("library") or ((meta or {}).get("cxx_runtime") or {}).get("library")
    exact = f"LD_PRELOAD={library} " if library and os.path.exists(library) else ""
    return (f"start Python with the compiler's C++ runtime loaded first: {exact or _PRELOAD_FIX + ' '}python ..."
            + (f" (generally: {_PRELOAD_FIX})" if exact else ""))


def check_cxx_runtime(path, meta: dict | None = None) -> dict:
    """Whether this process can load the CUDA package at ``path`` without the C++ runtime symbol
    clash that crashes torch's loader (see :func:`load`, ``runtime_check``). Returns a report
    (``verdict``: ``"ok"`` or ``"trial-ok"``, the symbols, libraries and versions looked at);
    raises :class:`PackageError` naming the clash and the ``LD_PRELOAD`` fix."""
    meta = meta if meta is not None else read_metadata(path)
    report: dict = {"verdict": None, "symbols": 0, "needed": None, "mapped": None, "foreign": {}}
    symbols: set[str] = set()
    needed = None
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if "/aotinductor/" in name and name.endswith(".so"):
                    found, version = _elf_cxx_imports(archive.read(name))
                    symbols.update(found)
                    needed = max(filter(None, (needed, version)), default=None)
    except (ValueError, struct.error, IndexError, zipfile.BadZipFile) as err:
        report["inconclusive"] = f"cannot read the package's C++ imports ({err})"
        symbols = set()
    report["symbols"], report["needed"] = len(symbols), _dotted(needed) if needed else None
    mapped = _mapped_cxx_runtimes()
    providers = _symbol_providers(sorted(symbols)) if symbols else None
    report["mapped"] = mapped
    if report.get("inconclusive") or mapped is None or providers is None or not symbols:
        report.setdefault("inconclusive", "cannot inspect this process's C++ runtime: "
                          + ("no /proc/self/maps" if mapped is None else "no dlsym/dladdr" if providers is None
                             else "the package's code imports no versioned libstdc++ symbols"))
        return _trial_load(path, meta, report)
    problems = []
    foreign = {s: lib for s, lib in providers.items() if not os.path.basename(lib).startswith("libstdc++")}
    report["foreign"] = foreign
    if foreign:
        by_lib: dict[str, list[str]] = {}
        for sym, lib in foreign.items():
            by_lib.setdefault(lib, []).append(sym)
        lib, syms = max(by_lib.items(), key=lambda kv: len(kv[1]))
        problems.append(f"{len(foreign)} of the {len(symbols)} C++ runtime symbols its code imports would bind to "
                        f"copies in {sorted(by_lib)} instead of libstdc++ (e.g. {syms[0]} from {lib})")
    # the runtime the package's imports bind to: the global provider, else (none is global) its own
    # libstdc++.so.6 dependency, which resolves to a runtime already mapped under that name
    runtimes = sorted((set(providers.values()) - set(foreign.values())) or set(mapped))
    report["runtimes"] = runtimes
    for lib in runtimes:
        have = _glibcxx_of(lib)
        if needed and have and have < needed:
            problems.append(f"{lib} defines GLIBCXX up to {_dotted(have)}; the package's code needs {_dotted(needed)}")
    if problems:
        raise PackageError(f"loading the CUDA package {path} here would crash torch's loader or fail in it (a C++ "
                           "runtime clash; a crash there cannot be caught from Python): " + "; ".join(problems)
                           + ". Fix: " + _preload_hint(meta) + ". load(..., runtime_check=False) skips this check")
    report["verdict"] = "ok"
    return report


_TRIAL = """
import json, sys
import torch
if sys.argv[3] == "ops":  # the package calls xquant:: ops: register them first, as load() does
    import xquant_fx.ops
from torch.export.pt2_archive._package import load_pt2
load_pt2(sys.argv[1], **json.loads(sys.argv[2]))
print("loaded")
"""


def _trial_cache_file() -> Path:
    """Where passed trial loads are remembered: ``$XQUANT_FX_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/xquant_fx``, else ``~/.cache/xquant_fx``."""
    root = os.environ.get("XQUANT_FX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "xquant_fx")
    return Path(root) / "cxx_runtime_trials.json"


def _trial_key(path, report: dict) -> str | None:
    """What a trial load's outcome depends on: the package's native code (the SHA-256 of each
    ``.so`` as its checksum manifest records it) and this process's C++ runtime (the libraries
    mapped, ``LD_PRELOAD``, the interpreter and torch). ``None`` without a manifest."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("/extra/" + MANIFEST_FILE))
            members = json.loads(archive.read(name).decode())["members"]
    except (StopIteration, OSError, zipfile.BadZipFile, ValueError, KeyError, TypeError):
        return None
    code = sorted(entry["sha256"] for member, entry in members.items() if member.endswith(".so"))
    process = [report.get("mapped"), os.environ.get("LD_PRELOAD", ""), sys.executable, torch.__version__]
    return hashlib.sha256(json.dumps([code, process]).encode()).hexdigest() if code else None


def _trial_passed_before(key: str | None) -> bool:
    if key is None:
        return False
    try:
        return key in json.loads(_trial_cache_file().read_text())
    except (OSError, ValueError, TypeError):
        return False


def _remember_trial(key: str | None) -> None:
    if key is None:
        return
    file = _trial_cache_file()
    try:
        known = json.loads(file.read_text()) if file.exists() else {}
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    known[key] = {"passed": True}
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        scratch = file.with_name(f"{file.name}.{os.getpid()}")
        scratch.write_text(json.dumps(known))
        os.replace(scratch, file)
    except OSError as err:  # a read-only home: the next load tries again, nothing else changes
        logger.info("xquant_fx: cannot remember the trial load in %s (%s)", file, err)


def _trial_load(path, meta: dict, report: dict) -> dict:
    """Load the package once in a child process (where a crash is reported, not inherited). A
    load that passed is remembered per package code and process runtime (:func:`_trial_key`), so
    the next :func:`load` of the same package in the same kind of process skips the child."""
    import signal

    key = _trial_key(path, report)
    if _trial_passed_before(key):
        report["verdict"], report["trial_cached"] = "trial-ok", True
        return report
    from torch.export.pt2_archive._package import load_pt2

    kwargs = {}
    accepts = set(inspect.signature(load_pt2).parameters)
    if meta.get("device") == "cuda" and "device_index" in accepts:
        kwargs["device_index"] = torch.cuda.current_device()
    if meta.get("weights") == "on_disk" and "load_weights_from_disk" in accepts:
        kwargs["load_weights_from_disk"] = True
    ops = "ops" if meta.get("runtime_ops") else "-"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                      env.get("PYTHONPATH")]))
    child = subprocess.run([sys.executable, "-c", _TRIAL, str(path), json.dumps(kwargs), ops], capture_output=True,
                           text=True, timeout=1800, env=env)
    report["trial_returncode"] = child.returncode
    if child.returncode < 0:
        try:
            name = signal.Signals(-child.returncode).name
        except ValueError:
            name = ""
        raise PackageError(f"loading the CUDA package {path} in a child process ended with signal {-child.returncode} "
                           f"{name} in torch's loader ({report['inconclusive']}, so it was tried there first); the "
                           "known cause is a C++ runtime clash. Fix: " + _preload_hint(meta)
                           + ". load(..., runtime_check=False) skips this check")
    if child.returncode != 0:  # an ordinary error: the load below raises it with its message
        logger.warning("xquant_fx: trial load of %s failed: %s", path, child.stderr.strip()[-500:])
    report["verdict"] = "trial-ok" if child.returncode == 0 else "trial-error"
    if child.returncode == 0:
        _remember_trial(key)
    return report
