"""What the CUDA package loader's C++ runtime pre-check sees, on a one-layer package (seconds).

    python benchmarks/probe_cxx_runtime.py [--device cuda] [--out DIR]

Exports ``nn.Linear`` with AOTInductor (no xquant ops), then prints, as one JSON line: the
``.so`` members, the ``libstdc++`` symbols and version each imports (ELF tables), the libraries
this process maps and would bind them to, and :func:`xquant_fx.aoti.check_cxx_runtime`'s report
(``verdict``, and ``inconclusive`` with its reason where it falls back to a trial load).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import xquant_fx.aoti as aoti  # noqa: E402
from xquant_fx.aoti import cxx_runtime  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="also write probe_cxx_runtime.json here")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="xq-probe-"))
    model = torch.nn.Linear(16, 16).to(args.device)
    program = torch.export.export(model, (torch.randn(2, 16, device=args.device),))
    start = time.perf_counter()
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(work / "linear.pt2"))
    out: dict = {"device": args.device, "torch": torch.__version__, "compile_s": round(time.perf_counter() - start, 1),
                 "mapped": cxx_runtime._mapped_cxx_runtimes(), "compiler": cxx_runtime._compiler_cxx_runtime(),
                 "members": {}}
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if not name.endswith(".so"):
                continue
            data = archive.read(name)
            entry: dict = {"bytes": len(data)}
            try:
                symbols, needed = cxx_runtime._elf_cxx_imports(data)
                entry.update(symbols=len(symbols), needed=cxx_runtime._dotted(needed), first=symbols[:4])
                providers = cxx_runtime._symbol_providers(symbols) or {}
                entry["providers"] = sorted(set(providers.values()))
            except Exception as err:  # noqa: BLE001 - the point is to see what fails
                entry["error"] = f"{type(err).__name__}: {err}"
            local = work / Path(name).name
            local.write_bytes(data)
            for tool in (["readelf", "-d", str(local)], ["readelf", "-V", "-W", str(local)]):
                try:
                    text = subprocess.run(tool, capture_output=True, text=True, timeout=60).stdout
                    entry[" ".join(tool[:2])] = [line.strip() for line in text.splitlines()
                                                 if "NEEDED" in line or "File:" in line or "GLIBCXX" in line][:24]
                except (OSError, subprocess.TimeoutExpired) as err:
                    entry[" ".join(tool[:2])] = str(err)
            out["members"][name] = entry
    meta = {"device": args.device}
    start = time.perf_counter()
    try:
        report = aoti.check_cxx_runtime(path, meta)
        out["check"] = {k: report.get(k) for k in ("verdict", "inconclusive", "symbols", "needed", "runtimes")}
    except aoti.PackageError as err:
        out["check"] = {"refused": str(err)}
    out["check_s"] = round(time.perf_counter() - start, 2)
    print("RESULT " + json.dumps(out), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "probe_cxx_runtime.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
