"""AOTInductor export: packages generate the eager cache's greedy tokens, and fail clearly.

Compiling a package runs Inductor and a C++ compiler (tens of seconds for the mini model, about two
minutes for SmolLM2 on two CPU cores), so each package is built once per module and shared; the
CPU tests pass ``cpp.simdlen=0`` (no vectorized kernels), which halves Inductor's code generation.
SmolLM2 is exported as a decode-only package (its prompt goes through the decode program one token
at a time): the prefill program would double the slowest compile of the suite.
"""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import warnings
import zipfile

import pytest
import torch

from mini_models import mini_model
from xquant_fx import XQuantCache, XQuantConfig, smollm2
from xquant_fx.api import cache_argument
from xquant_fx import aoti
from xquant_fx.aoti import PackageError, check_cxx_runtime, export, inspect_package, load, read_metadata, verify_package

FAST = {"cpp.simdlen": 0}
# R = 32 so that short tests quantize: prompts over 32 tokens leave the window, and the prefill
# program takes up to 32 tokens.
MINI_CONFIG = XQuantConfig.preset("xquant-1.38").replace(residual_length=32)
MINI_LEN = 96
SMOL_CONFIG = XQuantConfig.preset("xquant-1.38").replace(residual_length=32)
BATCH = 2


def prompt(length, batch=BATCH, seed=0):
    return torch.randint(1, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def eager_generate(model, ids, new, config, max_cache_len, **kwargs):
    cache = XQuantCache(model.config, config, max_batch_size=ids.shape[0], max_cache_len=max_cache_len)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new, do_sample=False, **{cache_argument(model): cache}, **kwargs)
    return out, cache


def eager_chunked(model, ids, new, config, max_cache_len, chunk):
    """Greedy tokens when the first ``chunk`` prompt tokens are prefilled at once and the rest fed
    one at a time (what a package does with a prompt longer than its prefill program)."""
    cache = XQuantCache(model.config, config, max_batch_size=ids.shape[0], max_cache_len=max_cache_len)
    arg = cache_argument(model)
    with torch.no_grad():
        logits = model(ids[:, :chunk], **{arg: cache}).logits[:, -1]
        for i in range(chunk, ids.shape[1]):
            logits = model(ids[:, i : i + 1], position_ids=torch.tensor([[i]]), **{arg: cache}).logits[:, -1]
        out = [logits.argmax(-1)]
        for i in range(new - 1):
            pos = ids.shape[1] + i
            logits = model(out[-1][:, None], position_ids=torch.tensor([[pos]]), **{arg: cache}).logits[:, -1]
            out.append(logits.argmax(-1))
    return torch.cat([ids, torch.stack(out, 1)], 1), cache


def assert_state_matches(lm, cache, stored):
    """The package's cache tensors equal the eager cache's: codes exactly, floats to rounding;
    window slots of positions not stored yet are not compared (both are never read)."""
    for key, tensor in lm.state.items():
        index, name = key.split(".", 1)
        ref = getattr(cache.layers[int(index)], name)
        if name.endswith("_window") and stored < tensor.shape[2]:
            tensor, ref = tensor[:, :, :stored], ref[:, :, :stored]
        if tensor.dtype == torch.int32:
            assert torch.equal(tensor, ref), key
        elif tensor.dtype == torch.float8_e4m3fn:
            # float8 scales / zero points: a float32 rounding difference before the cast may move a
            # value to the neighbouring float8 step (1/8 relative) and no further
            a, b = tensor.float(), ref.float()
            assert ((a - b).abs() <= b.abs() / 8 + 2**-9).all(), key
            assert (a != b).float().mean() < 0.01, key
        else:
            torch.testing.assert_close(tensor, ref, rtol=1e-5, atol=1e-5, msg=key)


# ---------------------------------------------------------------------------- mini Llama
@pytest.fixture(scope="module")
def mini():
    return mini_model("llama", num_hidden_layers=2)


@pytest.fixture(scope="module")
def mini_package(mini, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "mini.pt2"
    export(mini, prompt(8), path, MINI_CONFIG, max_cache_len=MINI_LEN, inductor_configs=FAST)
    return path


@pytest.fixture(scope="module")
def mini_lm(mini_package):
    return load(mini_package)


def test_mini_package_contents(mini_package):
    report = inspect_package(mini_package)
    meta = report["metadata"]
    assert set(report["models"]) == {"decode", "prefill"}
    assert meta["batch_size"] == BATCH and meta["max_cache_len"] == MINI_LEN
    assert meta["max_prompt_len"] == 32  # min(residual_length, max_cache_len)
    assert meta["fused_attention"] == 2 == meta["quantized_layers"]  # every layer's attention is xquant::attend
    assert meta["config"]["residual_length"] == 32 and meta["config"]["v_share_from"] == 0.5
    assert meta["runtime_ops"] == []  # the CPU package calls no Python-registered op
    for model in report["models"].values():
        assert model["xquant_ops"] == [] and model["xquant_kernels"] == [] and model["kernel_binaries"] == 0
    assert "1.v_codes" not in meta["state"]  # layer 1 reads layer 0's value codes (sharing)


@pytest.mark.parametrize("length", [1, 20, 32])
def test_mini_greedy_tokens_equal_eager(mini, mini_lm, length):
    """Prompts the prefill program takes whole (1..32 tokens, right-padded to 32)."""
    ids = prompt(length, seed=length)
    new = 40  # crosses R = 32: values and key groups get quantized during decode
    ref, cache = eager_generate(mini, ids, new, MINI_CONFIG, MINI_LEN)
    out = mini_lm.generate(ids, new)  # the model's eos (2), as transformers uses it
    assert torch.equal(out, ref)
    assert mini_lm.position == out.shape[1] - 1  # the last token is returned, not stored
    assert_state_matches(mini_lm, cache, mini_lm.position)
    assert mini_lm.last_timing["decode_steps"] == out.shape[1] - length - 1


def test_fp8_metadata_package_equals_eager(mini, tmp_path):
    """A config given as a spec string with float8 scales and zero points: the decode package keeps
    them in float8 and gives the eager cache's tokens and stored state."""
    spec = "kivi-2:metadata_dtype=float8_e4m3fn,residual_length=32"
    path = export(mini, prompt(8), tmp_path / "fp8.pt2", spec, max_cache_len=MINI_LEN, prefill=False,
                  inductor_configs=FAST)
    lm = load(path, config=spec)
    assert lm.state["0.k_scale"].dtype == torch.float8_e4m3fn and lm.config.metadata_dtype == "float8_e4m3fn"
    ids = prompt(20, seed=5)
    ref, cache = eager_generate(mini, ids, 30, spec, MINI_LEN)
    out = lm.generate(ids, 30)  # the model's eos, as transformers uses it
    assert torch.equal(out, ref)
    assert_state_matches(lm, cache, lm.position)


@pytest.mark.parametrize("spec", [
    "kivi-2:sink_tokens=4,rotation=hadamard,residual_length=32",
    "xquant-1.38:value_group_size=64,metadata_dtype=float8_e4m3fn,residual_length=32",
    "xquant-1.38:level_fit=lsq,eta=none,sink_tokens=2,residual_length=32",
])
def test_quality_options_package_equals_eager(mini, tmp_path, spec):
    """The quality options through export: sink tokens kept whole and the Hadamard rotation (of
    keys, values, and the query inside the package), 64-channel value groups with float8
    metadata, least-squares levels; the decode package gives the eager cache's tokens and stored
    state, sink buffers included."""
    config = XQuantConfig.from_spec(spec)
    path = export(mini, prompt(8), tmp_path / "options.pt2", spec, max_cache_len=MINI_LEN, prefill=False,
                  inductor_configs=FAST)
    lm = load(path, config=spec)
    assert lm.metadata["fused_attention"] == mini.config.num_hidden_layers
    ids = prompt(20, seed=6)
    ref, cache = eager_generate(mini, ids, 30, spec, MINI_LEN)
    out = lm.generate(ids, 30)
    assert torch.equal(out, ref)
    assert_state_matches(lm, cache, lm.position)
    if config.sink_tokens:
        assert any("sink" in name for name in lm.state)
    if config.value_group_size:
        assert lm.state["0.v_scale"].shape[-1] == mini.config.head_dim // config.value_group_size == 1


def test_mini_long_prompt_goes_through_decode(mini, mini_lm):
    """A 50-token prompt: 32 tokens through prefill, 18 through decode; the same tokens and
    storage as the eager cache fed that way."""
    ids = prompt(50, seed=3)
    ref, cache = eager_chunked(mini, ids, 12, MINI_CONFIG, MINI_LEN, chunk=32)
    assert torch.equal(mini_lm.generate(ids, 12, eos_token_id=None), ref)
    assert_state_matches(mini_lm, cache, mini_lm.position)


def test_mini_eos_stops_like_transformers(mini, mini_lm):
    ids = prompt(12, seed=5)
    free = mini_lm.generate(ids, 16, eos_token_id=None)
    eos = int(free[0, 12 + 3])  # the 4th new token of the first sequence
    ref, _ = eager_generate(mini, ids, 16, MINI_CONFIG, MINI_LEN, eos_token_id=eos, pad_token_id=0)
    out = mini_lm.generate(ids, 16, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, ref)


def test_mini_reset_and_steps(mini_lm):
    ids = prompt(10, seed=7)
    logits = mini_lm.prefill(ids)
    assert logits.shape == (BATCH, 128) and mini_lm.position == 10
    again = mini_lm.prefill(ids)  # prefill starts over: same logits
    assert torch.equal(logits, again)
    mini_lm.step(logits.argmax(-1))
    assert mini_lm.position == 11
    mini_lm.reset()
    assert mini_lm.position == 0 and all(not t.any() for t in mini_lm.state.values())
    assert mini_lm.config == MINI_CONFIG
    assert "LlamaForCausalLM" in repr(mini_lm) and "programs ['decode', 'prefill']" in repr(mini_lm)


def test_package_runs_in_a_fresh_process(mini, mini_package):
    """Package + token ids only, in a new interpreter: no model object, and neither the xquant ops
    nor their kernels are imported."""
    ids = prompt(9, seed=13)
    ref, _ = eager_generate(mini, ids, 8, MINI_CONFIG, MINI_LEN)
    script = textwrap.dedent(f"""
        import sys, torch
        from xquant_fx.aoti import load
        lm = load({str(mini_package)!r})
        out = lm.generate(torch.tensor({ids.tolist()}), 8)
        print(out.tolist())
        print(sorted(m for m in ("xquant_fx.ops", "xquant_fx.kernels") if m in sys.modules))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    tokens, imported = run.stdout.strip().splitlines()[-2:]
    assert json.loads(tokens) == ref.tolist()
    assert imported == "[]"


# ---------------------------------------------------------------------------- errors
def test_export_refuses_bad_arguments(mini, tmp_path):
    ids = prompt(4)
    with pytest.raises(ValueError, match="must end in .pt2"):
        export(mini, ids, tmp_path / "model.so", max_cache_len=32)
    with pytest.raises(ValueError, match="does not exist"):
        export(mini, ids, tmp_path / "missing" / "model.pt2", max_cache_len=32)
    with pytest.raises(ValueError, match="max_cache_len"):
        export(mini, ids, tmp_path / "m.pt2", max_cache_len=None)
    with pytest.raises(ValueError, match=r"shape \[batch, length\]"):
        export(mini, ids[0], tmp_path / "m.pt2", max_cache_len=32)
    with pytest.raises(ValueError, match="integer token ids"):
        export(mini, ids.float(), tmp_path / "m.pt2", max_cache_len=32)
    with pytest.raises(ValueError, match="unknown preset"):
        export(mini, ids, tmp_path / "m.pt2", "xquant-9", max_cache_len=32)
    with pytest.raises(ValueError, match="unknown field 'bits'"):
        export(mini, ids, tmp_path / "m.pt2", "kivi-2:bits=3", max_cache_len=32)
    with pytest.raises(ValueError, match="MoE options"):
        export(mini, ids, tmp_path / "m.pt2", "kivi-2:moe_top_k=2", max_cache_len=32)
    with pytest.raises(ValueError, match="torch.compile"):
        export(torch.compile(mini), ids, tmp_path / "m.pt2", max_cache_len=32)
    with pytest.raises(ValueError, match="aot_inductor.package_constants_in_so"):
        export(mini, ids, tmp_path / "m.pt2", max_cache_len=32,
               inductor_configs={"aot_inductor.package_constants_in_so": True})
    sliding = mini_model("mistral", num_hidden_layers=2, sliding_window=32)
    with pytest.raises(ValueError, match="sliding-window cache"):
        export(sliding, ids, tmp_path / "m.pt2", max_cache_len=64)
    assert not list(tmp_path.iterdir())  # nothing written


def test_load_refuses_what_is_not_a_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="no package at"):
        load(tmp_path / "absent.pt2")
    (tmp_path / "garbage.pt2").write_bytes(b"not a zip")
    with pytest.raises(PackageError, match="not a zip file"):
        load(tmp_path / "garbage.pt2")
    with zipfile.ZipFile(tmp_path / "other.pt2", "w") as z:
        z.writestr("other/data/aotinductor/model/x.cpp", "")
    with pytest.raises(PackageError, match="not an xquant_fx package"):
        load(tmp_path / "other.pt2")
    with pytest.raises(PackageError, match="not a file"):
        load(tmp_path)


def rewrite_package(src, dst, change=lambda name, data: data, manifest=True, extra=()):
    """Copy a package member by member through ``change(name, data)`` (``None`` drops the member),
    then add the ``extra`` (name, data) members; ``manifest=True`` writes a fresh checksum manifest
    (what anyone who alters a package can do), ``"keep"`` keeps the original one, ``False`` none."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            is_manifest = item.filename.endswith("extra/" + aoti.MANIFEST_FILE)
            data = zin.read(item)
            if is_manifest:
                if manifest == "keep":
                    zout.writestr(item, data)
                continue
            data = change(item.filename, data)
            if data is not None:
                zout.writestr(item, data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile warns about a duplicate name
            for name, data in extra:
                zout.writestr(name, data)
    if manifest is True:
        aoti.package._add_manifest(str(dst))


def rewrite_metadata(src, dst, **changes):
    def change(name, data):
        if name.endswith("extra/xquant_fx.json"):
            meta = json.loads(data)
            meta.update(changes)
            data = json.dumps(meta).encode()
        return data

    rewrite_package(src, dst, change)


def test_load_refuses_other_shapes_configs_and_versions(mini_package, tmp_path):
    with pytest.raises(PackageError, match=r"v_bits=1 \(requested 2\)"):
        load(mini_package, config="kivi-2")
    with pytest.raises(PackageError, match=r"residual_length=32 \(requested 128\)"):
        load(mini_package, config="xquant-1.38")
    load(mini_package, config=MINI_CONFIG, max_cache_len=MINI_LEN, batch_size=BATCH, device="cpu")
    with pytest.raises(PackageError, match=r"max_cache_len=96 \(requested 128\)"):
        load(mini_package, max_cache_len=128)
    with pytest.raises(PackageError, match=r"batch_size=2 \(requested 1\)"):
        load(mini_package, batch_size=1)
    with pytest.raises(PackageError, match=r"device cpu \(requested cuda\)"):
        load(mini_package, device="cuda")
    rewrite_metadata(mini_package, tmp_path / "future.pt2", format_version=99)
    with pytest.raises(PackageError, match="package format 99"):
        load(tmp_path / "future.pt2")
    rewrite_metadata(mini_package, tmp_path / "ops.pt2", runtime_ops=["xquant::gone"])
    with pytest.raises(PackageError, match="does not register"):
        load(tmp_path / "ops.pt2")
    if not torch.cuda.is_available():
        rewrite_metadata(mini_package, tmp_path / "gpu.pt2", device="cuda")
        with pytest.raises(PackageError, match="no usable CUDA device"):
            load(tmp_path / "gpu.pt2")


def test_runner_refuses_bad_inputs(mini_lm):
    with pytest.raises(ValueError, match="exported for batch 2"):
        mini_lm.generate(prompt(5, batch=1), 4)
    with pytest.raises(ValueError, match="need 100 cache positions"):
        mini_lm.generate(prompt(60), 41)
    with pytest.raises(ValueError, match="integer token ids"):
        mini_lm.generate(prompt(5).float(), 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        mini_lm.generate(prompt(5), 0)
    mini_lm.prefill(prompt(MINI_LEN))
    with pytest.raises(ValueError, match="the cache is full"):
        mini_lm.step(torch.ones(BATCH, dtype=torch.long))


# ---------------------------------------------------------------------------- integrity
def members(path):
    with zipfile.ZipFile(path) as z:
        return {i.filename: z.read(i) for i in z.infolist()}


def test_package_carries_a_checksum_manifest(mini_package):
    contents = members(mini_package)
    (name,) = [n for n in contents if n.endswith("extra/" + aoti.MANIFEST_FILE)]
    manifest = json.loads(contents.pop(name))
    assert manifest == verify_package(mini_package)
    assert manifest["algorithm"] == "sha256" and set(manifest["members"]) == set(contents)
    assert any(n.endswith(".so") for n in contents) and any("/weights/" in n for n in contents)
    for member, data in contents.items():
        assert manifest["members"][member] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.fixture
def no_native_load(monkeypatch):
    """Fail the test if torch's package loader (which dlopens the .so files) is reached."""
    import torch.export.pt2_archive._package as package

    def refuse(*args, **kwargs):
        raise AssertionError("the package's native code was loaded")

    monkeypatch.setattr(package, "load_pt2", refuse)


def test_flipped_block_is_refused_before_native_code(mini_package, tmp_path, no_native_load):
    """4 KB inverted in the middle of the file (it loaded and generated wrong tokens before the
    manifest): refused, naming the member that holds those bytes, and no .so was loaded."""
    data = bytearray(mini_package.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(b ^ 0xFF for b in data[middle : middle + 4096])
    damaged = tmp_path / "damaged.pt2"
    damaged.write_bytes(bytes(data))
    with zipfile.ZipFile(mini_package) as z:
        starts = sorted((i.header_offset, i.filename) for i in z.infolist())
    hit = [name for (start, name), (end, _) in zip(starts, starts[1:] + [(len(data), "")]) if start <= middle < end]
    assert len(hit) == 1
    with pytest.raises(ValueError, match="damaged: member '" + hit[0].replace(".", r"\.") + "'") as err:
        load(damaged)
    assert isinstance(err.value, PackageError)


def test_altered_members_are_refused(mini_package, tmp_path, no_native_load):
    """A member changed with a valid zip CRC (only the SHA-256 catches it), one added, one removed,
    one present twice: each refused by name; a re-signed package passes, as documented."""
    def flip_decode_so(name, data):
        return data[:-1] + bytes([data[-1] ^ 1]) if name.endswith(".so") and "/decode/" in name else data

    rewrite_package(mini_package, tmp_path / "so.pt2", flip_decode_so, manifest="keep")
    with pytest.raises(PackageError, match=r"member '[^']*/decode/[^']*\.so' does not match its SHA-256"):
        verify_package(tmp_path / "so.pt2")
    rewrite_package(mini_package, tmp_path / "added.pt2", manifest="keep", extra=[("mini/data/evil.so", b"x")])
    with pytest.raises(PackageError, match="holds member 'mini/data/evil.so', which its checksum manifest does not"):
        load(tmp_path / "added.pt2")
    rewrite_package(mini_package, tmp_path / "removed.pt2", lambda n, d: None if n.endswith("weight_3") else d,
                    manifest="keep")
    with pytest.raises(PackageError, match="lacks member '[^']*weight_3'"):
        load(tmp_path / "removed.pt2")
    so = next(n for n in members(mini_package) if n.endswith(".so"))
    rewrite_package(mini_package, tmp_path / "twice.pt2", manifest="keep", extra=[(so, b"x")])
    with pytest.raises(PackageError, match="more than once"):
        load(tmp_path / "twice.pt2")
    rewrite_package(mini_package, tmp_path / "resigned.pt2", flip_decode_so, manifest=True)
    verify_package(tmp_path / "resigned.pt2")  # checksums detect corruption, not malice


def test_package_without_manifest(mini_package, mini_lm, tmp_path):
    """A package written before manifests: a clear error with the way out; verify=False loads it."""
    rewrite_package(mini_package, tmp_path / "old.pt2", manifest=False)
    with pytest.raises(PackageError, match=r"no checksum manifest.*verify=False"):
        load(tmp_path / "old.pt2")
    ids = prompt(7, seed=21)
    assert torch.equal(load(tmp_path / "old.pt2", verify=False).generate(ids, 6), mini_lm.generate(ids, 6))


def test_out_of_range_token_ids_are_refused(mini_lm):
    """The compiled programs index the embedding unchecked (a C++ error dump before): refused with
    the id and where it is, and nothing stored."""
    ids = prompt(6, seed=4)
    mini_lm.prefill(ids)
    bad = ids.clone()
    bad[1, 4] = 128
    with pytest.raises(ValueError, match=r"input_ids holds token id 128 at \[1, 4\], outside the model's vocabulary"):
        mini_lm.generate(bad, 3)
    bad[1, 4] = -3
    with pytest.raises(ValueError, match="token id -3 at"):
        mini_lm.prefill(bad)
    with pytest.raises(ValueError, match="token_ids holds token id 1000 at"):
        mini_lm.step(torch.tensor([5, 1000]))
    with pytest.raises(ValueError, match="pad_token_id 500"):
        mini_lm.generate(ids, 3, eos_token_id=2, pad_token_id=500)
    assert mini_lm.position == 6  # the refused calls stored nothing
    assert read_metadata(mini_lm.path)["input_vocab_size"] == 128


def test_cxx_runtime_check(mini_package, monkeypatch, tmp_path):
    """The CUDA loader's pre-check, run here on the CPU package's .so files: this process binds the
    package's C++ runtime imports to one libstdc++ that is new enough; a foreign provider, an older
    runtime, or a trial load that dies are refused with the LD_PRELOAD fix; a trial load that
    passed is remembered for the same package code and process runtime, not for another."""
    monkeypatch.setenv("XQUANT_FX_CACHE_DIR", str(tmp_path / "cache"))
    report = check_cxx_runtime(mini_package)
    assert report["verdict"] == "ok" and report["symbols"] > 20 and not report["foreign"]
    assert report["needed"].startswith("3.4.") and all("libstdc++" in lib for lib in report["runtimes"])
    symbol = "_ZNSt6localeC1Ev"  # std::locale::locale(), which the package imports
    monkeypatch.setattr(aoti.cxx_runtime, "_symbol_providers", lambda symbols: {symbol: "/opt/other/libbundled.so"})
    with pytest.raises(PackageError, match=r"would crash.*libbundled\.so.*LD_PRELOAD="):
        check_cxx_runtime(mini_package)
    monkeypatch.setattr(aoti.cxx_runtime, "_symbol_providers", lambda symbols: {})
    monkeypatch.setattr(aoti.cxx_runtime, "_glibcxx_of", lambda library: (3, 4, 1))
    with pytest.raises(PackageError, match=r"defines GLIBCXX up to 3\.4\.1; the package's code needs 3\.4\.\d+"):
        check_cxx_runtime(mini_package)
    # inconclusive (no /proc/self/maps): a trial load in a child process decides
    monkeypatch.setattr(aoti.cxx_runtime, "_mapped_cxx_runtimes", lambda: None)
    monkeypatch.setattr(aoti.cxx_runtime, "_TRIAL", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    with pytest.raises(PackageError, match=r"child process ended with signal 11 SIGSEGV.*LD_PRELOAD="):
        check_cxx_runtime(mini_package)
    assert not (tmp_path / "cache").exists()  # a crash is not remembered
    monkeypatch.undo()
    monkeypatch.setenv("XQUANT_FX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(aoti.cxx_runtime, "_mapped_cxx_runtimes", lambda: None)
    report = check_cxx_runtime(mini_package)  # torch loads it in the child
    assert report["verdict"] == "trial-ok" and "trial_cached" not in report
    assert "no /proc/self/maps" in report["inconclusive"]
    # remembered: the same package in the same kind of process starts no child (one that would crash)
    monkeypatch.setattr(aoti.cxx_runtime, "_TRIAL", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    report = check_cxx_runtime(mini_package)
    assert report["verdict"] == "trial-ok" and report["trial_cached"]
    # another C++ runtime setup (here LD_PRELOAD) is not covered by that verdict
    monkeypatch.setenv("LD_PRELOAD", "/nonexistent/libstdc++.so.6")
    with pytest.raises(PackageError, match="signal 11"):
        check_cxx_runtime(mini_package)


def test_symbol_providers_find_dlsym_outside_the_global_scope(monkeypatch):
    """Where the process's global scope yields no ``dlsym`` (an interpreter that does not export
    it), the C library's is used; with none anywhere the inspection says so (``None``)."""
    symbol = "malloc"  # global in every process (the C library's)
    want = aoti.cxx_runtime._symbol_providers([symbol])
    assert want and "libc" in want[symbol]
    monkeypatch.setattr(aoti.cxx_runtime, "_DL_LIBRARIES", ("libxquant-none.so", "libc.so.6"))
    assert aoti.cxx_runtime._symbol_providers([symbol]) == want
    monkeypatch.setattr(aoti.cxx_runtime, "_DL_LIBRARIES", ("libxquant-none.so",))
    assert aoti.cxx_runtime._symbol_providers([symbol]) is None


def test_read_metadata_without_loading(mini_package):
    meta = read_metadata(mini_package)
    assert meta["device"] == "cpu" and meta["dtype"] == "torch.float32" and meta["model_class"] == "LlamaForCausalLM"
    # 64 quantizable tokens of 2-bit codes, packed 16 to a word along the tokens
    assert meta["state"]["0.k_codes"] == {"shape": [BATCH, 2, 4, 64], "dtype": "torch.int32"}


# ---------------------------------------------------------------------------- SmolLM2
QUESTION = "What is the capital of France?"
SMOL_NEW = 12


@pytest.fixture(scope="module")
def smol():
    return smollm2.load(torch.float32)


def test_smollm2_decode_package_matches_eager(smol, tmp_path_factory):
    """The real SmolLM2-135M, xquant-1.38 with a 32-token window (the prompt's first keys and
    values are quantized; a cache no longer than the window would keep every layer whole): a
    decode-only package (see the module docstring) generates the eager cache's greedy tokens, all
    30 attentions fused."""
    model, tokenizer = smol
    ids = smollm2.chat_ids(tokenizer, QUESTION)
    length = ids.shape[1] + SMOL_NEW
    path = tmp_path_factory.mktemp("smol") / "smollm2.pt2"
    export(model, ids, path, SMOL_CONFIG, max_cache_len=length, prefill=False, inductor_configs=FAST)
    lm = load(path, config=SMOL_CONFIG, max_cache_len=length)
    assert lm.metadata["fused_attention"] == 30
    ref, _ = eager_generate(model, ids, SMOL_NEW, SMOL_CONFIG, length)
    out = lm.generate(ids, SMOL_NEW)  # the model's eos, as generate uses it
    assert torch.equal(out, ref)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])
