import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from xquant_fx import XQuantCache
from xquant_fx.memory import (
    CONFIG_DIR,
    _largest_fitting,
    bundled_configs,
    cache_bytes,
    format_plan,
    load_config,
    parse_memory,
    plan,
    weight_bytes,
)
from xquant_fx.cli.memory import main

BUNDLED = ["deepseek-v2-lite", "llama-3.1-8b", "mistral-7b", "qwen3-30b-a3b", "qwen3-8b", "smollm2-135m"]

# SmolLM2-135M parameters, counted by hand:
#   embeddings (tied with lm_head, counted once)  49152 * 576                      = 28,311,552
#   per layer: q, o 576*576; k, v 576*192; mlp 3 * 576*1536; 2 norms * 576      = 3,540,096
#   30 layers                                                                      = 106,202,880
#   final norm                                                                     = 576
SMOLLM2_PARAMS = 28_311_552 + 30 * 3_540_096 + 576  # 134,515,008


# ------------------------------------------------------------------ parse_memory
@pytest.mark.parametrize(
    "text, expected",
    [
        ("80GB", 80 * 10**9),
        ("80gb", 80 * 10**9),
        ("141GiB", 141 * 2**30),
        ("80e9", 80 * 10**9),
        ("1.5GB", 1_500_000_000),
        ("512 MiB", 512 * 2**20),
        (" 2TB ", 2 * 10**12),
        ("1024", 1024),
        ("4096B", 4096),
        ("1e3KiB", 1000 * 1024),
        (12345, 12345),
    ],
)
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "abc", "80 XB", "80G", "-5GB", "0GB", "1e400GB", "80 GB GB", "nanGB"])
def test_parse_memory_rejects_junk(text):
    with pytest.raises(ValueError, match="memory"):
        parse_memory(text)


def test_parse_memory_rejects_non_strings():
    for bad in (None, 1.5, True, 0):
        with pytest.raises(ValueError):
            parse_memory(bad)


# ------------------------------------------------------------------ configs
def test_bundled_names():
    assert bundled_configs() == BUNDLED


@pytest.mark.parametrize("name", BUNDLED)
def test_every_bundled_config_loads(name, tmp_path):
    data = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    direct = AutoConfig.for_model(**data)
    config = load_config(name)
    assert type(config) is type(direct)
    assert config.name_or_path == name
    assert config.architectures == data["architectures"]
    # a directory holding config.json and a path to a json file load the same config
    shutil.copy(CONFIG_DIR / f"{name}.json", tmp_path / "config.json")
    for source in (tmp_path, tmp_path / "config.json", str(CONFIG_DIR / f"{name}.json")):
        other = load_config(source)
        assert type(other) is type(direct)
        for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size"):
            assert getattr(other, key) == data[key]
    # the cache can hold every bundled model
    assert cache_bytes(config, "xquant-1.38", 1, 4096) > 0


def test_bundled_architecture_facts():
    llama = load_config("llama-3.1-8b")
    assert (llama.num_hidden_layers, llama.hidden_size, llama.num_key_value_heads, llama.head_dim) == (32, 4096, 8, 128)
    assert (llama.intermediate_size, llama.vocab_size, llama.max_position_embeddings) == (14336, 128256, 131072)
    assert llama.rope_parameters["rope_theta"] == 500000
    smol = load_config("smollm2-135m")
    assert smol.tie_word_embeddings and (smol.num_attention_heads, smol.num_key_value_heads) == (9, 3)
    assert load_config("mistral-7b").sliding_window is None
    moe = load_config("qwen3-30b-a3b")
    assert (moe.num_experts, moe.num_experts_per_tok, moe.moe_intermediate_size) == (128, 8, 768)
    ds = load_config("deepseek-v2-lite")
    assert (ds.kv_lora_rank, ds.qk_nope_head_dim, ds.qk_rope_head_dim, ds.v_head_dim) == (512, 128, 64, 128)
    assert (ds.n_routed_experts, ds.num_experts_per_tok, ds.n_shared_experts, ds.first_k_dense_replace) == (64, 6, 2, 1)


def test_unknown_config_lists_bundled_names():
    with pytest.raises(ValueError) as info:
        load_config("no-such-model")
    for name in BUNDLED:
        assert name in str(info.value)


def test_bad_config_files(tmp_path):
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        load_config(tmp_path / "junk.json")
    (tmp_path / "nomodel.json").write_text('{"hidden_size": 8}')
    with pytest.raises(ValueError, match="model_type"):
        load_config(tmp_path / "nomodel.json")
    with pytest.raises(ValueError, match="config.json"):
        load_config(tmp_path)


# ------------------------------------------------------------------ weights
def test_weight_bytes_smollm2_exact():
    assert SMOLLM2_PARAMS == 134_515_008
    assert weight_bytes("smollm2-135m") == SMOLLM2_PARAMS * 2 == 269_030_016
    assert weight_bytes("smollm2-135m", torch.float32) == SMOLLM2_PARAMS * 4
    untied = load_config("smollm2-135m")
    untied.tie_word_embeddings = False
    assert weight_bytes(untied) == (SMOLLM2_PARAMS + 49152 * 576) * 2


def test_weight_bytes_llama3_8b():
    assert weight_bytes("llama-3.1-8b") == 8_030_261_248 * 2


# ------------------------------------------------------------------ search
def test_largest_fitting():
    assert _largest_fitting(lambda n: n <= 0) == 0
    assert _largest_fitting(lambda n: n <= 1) == 1
    for limit in (2, 3, 1000, 1023, 1024, 1025, 123_456_789):
        assert _largest_fitting(lambda n: n <= limit) == limit
    assert _largest_fitting(lambda n: True, cap=1000) is None
    assert _largest_fitting(lambda n: n <= 999, cap=1000) == 999


# ------------------------------------------------------------------ plan
@pytest.fixture(scope="module")
def llama():
    return load_config("llama-3.1-8b")


def test_plan_budget_and_defaults(llama):
    p = plan(llama, "xquant-1.38", "80GB")
    assert p.weight_bytes == weight_bytes(llama)
    assert p.reserve_bytes == 8 * 10**9
    assert p.cache_budget_bytes == 80 * 10**9 - 8 * 10**9 - p.weight_bytes
    assert p.max_cache_len == 32768  # 131072 capped at 32768
    assert p.batch_size == 1 and p.weights_fit and p.dtype == "bf16"
    assert p.preset.preset == "xquant-1.38" and p.baseline.preset == "fp16"
    assert p.preset.code_bits == pytest.approx(1.375)
    assert p.baseline.code_bits == 16 and p.baseline.stored_bits == 16
    assert p.baseline.bytes_per_token == 32 * 8 * 128 * 2 * 2  # layers * kv heads * head_dim * (K, V) * bf16
    assert plan("smollm2-135m", "kivi-2", "8GB").max_cache_len == 8192


def test_plan_monotonic_in_compression(llama):
    plans = {name: plan(llama, name, "80GB", batch_size=4) for name in ("xquant-1.38", "kivi-2", "fp16")}
    x, k, f = (plans[n].preset for n in ("xquant-1.38", "kivi-2", "fp16"))
    assert x.max_tokens > k.max_tokens > f.max_tokens > 0
    assert x.max_batch > k.max_batch > f.max_batch > 0
    assert x.stored_bits < k.stored_bits < f.stored_bits
    assert plans["kivi-2"].baseline == plans["fp16"].preset == plans["xquant-1.38"].baseline


@pytest.mark.parametrize(
    "name, preset, gpu, batch, length",
    [
        ("llama-3.1-8b", "xquant-1.38", "80GB", 1, None),
        ("llama-3.1-8b", "kivi-2", "24GiB", 3, 4096),
        ("smollm2-135m", "xquant-1.15", "1GB", 2, 1000),
        ("deepseek-v2-lite", "asymkv-1.5", "141GiB", 8, 8192),
        ("qwen3-8b", "fp16", "40GB", 1, 32768),
    ],
)
def test_solution_is_tight(name, preset, gpu, batch, length):
    config = load_config(name)
    p = plan(config, preset, gpu, max_cache_len=length, batch_size=batch)
    budget = p.cache_budget_bytes
    for fit, xq in ((p.preset, preset), (p.baseline, "fp16")):
        n, b, L = fit.max_tokens, fit.max_batch, p.max_cache_len
        assert n > 0 and b > 0
        assert cache_bytes(config, xq, batch, n) <= budget < cache_bytes(config, xq, batch, n + 1)
        assert cache_bytes(config, xq, b, L) <= budget < cache_bytes(config, xq, b + 1, L)
        assert fit.cache_bytes == cache_bytes(config, xq, batch, L)
        assert fit.fits == (fit.cache_bytes <= budget)
        report = XQuantCache(config, xq, max_batch_size=1, max_cache_len=L).memory_report(torch.bfloat16)
        assert fit.bytes_per_token == report["bytes"] / L
        assert (fit.code_bits, fit.stored_bits) == (report["code_bits"], report["stored_bits"])


def test_plan_weights_do_not_fit(llama):
    p = plan(llama, "xquant-1.38", "16GB")
    assert not p.weights_fit and p.cache_budget_bytes == 0
    assert p.preset.max_tokens == p.preset.max_batch == 0 and not p.preset.fits
    assert "do not fit" in format_plan(p)


def test_plan_fp32_and_reserve(llama):
    bf16 = plan(llama, "kivi-2", "141GiB", reserve_fraction=0.0)
    fp32 = plan(llama, "kivi-2", "141GiB", dtype="fp32", reserve_fraction=0.0)
    assert fp32.weight_bytes == 2 * bf16.weight_bytes
    assert fp32.preset.max_tokens < bf16.preset.max_tokens
    assert bf16.reserve_bytes == 0 and bf16.cache_budget_bytes == 141 * 2**30 - bf16.weight_bytes


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(gpu_memory_bytes=None),
        dict(gpu_memory_bytes="lots"),
        dict(gpu_memory_bytes=0),
        dict(gpu_memory_bytes="80GB", batch_size=0),
        dict(gpu_memory_bytes="80GB", max_cache_len=-1),
        dict(gpu_memory_bytes="80GB", reserve_fraction=1.0),
        dict(gpu_memory_bytes="80GB", dtype="int8"),
        dict(gpu_memory_bytes="80GB", preset_or_xquant_config="kivi-3"),
    ],
)
def test_plan_rejects_bad_arguments(llama, kwargs):
    kwargs.setdefault("preset_or_xquant_config", "xquant-1.38")
    with pytest.raises(ValueError):
        plan(llama, **kwargs)


# ------------------------------------------------------------------ CLI
def test_main_prints_table(capsys):
    assert main(["--config", "llama-3.1-8b", "--preset", "xquant-1.38", "--gpu-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "xquant-1.38" in out and "fp16" in out and "max batch" in out and "llama-3.1-8b" in out


def test_main_options_and_json(capsys):
    argv = ["--config", "smollm2-135m", "--preset", "kivi-2", "--gpu-memory", "2GiB", "--max-cache-len", "2048",
            "--batch-size", "4", "--dtype", "fp16", "--json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["preset"]["preset"] == "kivi-2" and data["max_cache_len"] == 2048 and data["batch_size"] == 4
    assert data["dtype"] == "fp16" and data["gpu_memory_bytes"] == 2 * 2**30


def test_main_errors(capsys):
    assert main(["--config", "nope", "--gpu-memory", "80GB"]) == 2
    assert "llama-3.1-8b" in capsys.readouterr().err
    assert main(["--config", "llama-3.1-8b", "--gpu-memory", "eighty"]) == 2
    assert "memory" in capsys.readouterr().err


def test_with_layers_cuts_a_config_and_its_per_layer_fields():
    from xquant_fx.memory import with_layers

    config = load_config("qwen3-30b-a3b")
    whole = config.num_hidden_layers
    assert with_layers(config, 0) is config and config.num_hidden_layers == whole
    config.layer_types = ["full_attention"] * whole
    config.mlp_only_layers = [0, 3, 5]
    assert with_layers(config, 4) is config
    assert config.num_hidden_layers == 4 and config.layer_types == ["full_attention"] * 4
    assert config.mlp_only_layers == [0, 3]  # layer indices, not per-layer entries


# ------------------------------------------------------------------ bad configs, CLI errors
def _config_file(tmp_path, **changes):
    data = json.loads((CONFIG_DIR / "smollm2-135m.json").read_text())
    data.update(changes)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize(
    "changes,message",
    [
        # 0 or negative layers used to end in a ZeroDivisionError traceback.
        (dict(num_hidden_layers=0), "num_hidden_layers=0, must be a positive int"),
        (dict(num_hidden_layers=-3), "num_hidden_layers=-3, must be a positive int"),
        (dict(num_key_value_heads=0), "num_key_value_heads=0, must be a positive int"),
        (dict(num_attention_heads=0), "num_attention_heads"),
    ],
)
def test_degenerate_configs_are_refused_in_one_line(tmp_path, capsys, changes, message):
    from xquant_fx.cli import main as cli_main

    assert cli_main(["memory", "--config", _config_file(tmp_path, **changes), "--gpu-memory", "80GB"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert err.startswith(("python -m xquant_fx memory: error:", "pytest memory: error:"))
    with pytest.raises(ValueError, match=message):
        plan(_config_file(tmp_path, **changes), "kivi-2", "80GB")


def test_lengths_beyond_the_search_cap_are_refused(capsys):
    assert main(["--config", "smollm2-135m", "--gpu-memory", "80GB", "--max-cache-len", str(10**20)]) == 2
    assert "max_cache_len=100,000,000,000,000,000,000 is beyond what the planner sizes" in capsys.readouterr().err
    with pytest.raises(ValueError, match="batch_size=2,199,023,255,553 is beyond"):
        plan("smollm2-135m", "kivi-2", "80GB", batch_size=2**41 + 1)


def test_share_start_past_the_model_is_refused(capsys):
    assert main(["--config", "smollm2-135m", "--preset", "kivi-2:v_share_from=100", "--gpu-memory", "80GB"]) == 2
    err = capsys.readouterr().err
    assert "v_share_from=100: the model has 30 layers" in err and err.startswith("python -m xquant_fx memory: error:")


def _site_without(tmp_path, hidden):
    """A directory of links to everything in this environment's site-packages but ``hidden``
    (and .pth files, whose editable finders would bring the package back): with ``python -S`` and
    it on PYTHONPATH, a process sees the environment as if ``hidden`` had never been installed."""
    import sysconfig

    site = tmp_path / "site"
    site.mkdir()
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    for root in roots:
        for entry in Path(root).iterdir():
            top = entry.name.split("-")[0].split(".")[0].lower()
            if top in hidden or entry.suffix == ".pth" or (site / entry.name).exists():
                continue
            (site / entry.name).symlink_to(entry)
    return site


def test_cpu_commands_need_neither_triton_nor_torchao(tmp_path):
    """pyproject leaves triton to the `test`/`triton` extras and torchao out: importing the package
    and running a CPU command must not need them, and print nothing on stderr."""
    import os
    import subprocess
    import sys

    import xquant_fx

    site = _site_without(tmp_path, {"triton", "torchao"})
    repo = Path(xquant_fx.__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{repo}")
    env.pop("TRITON_INTERPRET", None)

    def python(*args):
        return subprocess.run([sys.executable, "-S", *args], capture_output=True, text=True, env=env, timeout=300,
                              cwd=tmp_path)

    done = python("-m", "xquant_fx", "memory", "--config", "smollm2-135m", "--preset", "xquant-1.38",
                  "--gpu-memory", "24GB")
    assert done.returncode == 0, done.stderr
    assert "xquant-1.38" in done.stdout and "max batch" in done.stdout
    assert done.stderr == ""
    # The ops (imported with the first quantized cache) register through torch.library.triton_op,
    # which logs a notice per op without triton; the commands drop that notice, and only it.
    script = """
import importlib.util, logging, sys
assert importlib.util.find_spec("triton") is None, "the set-up did not hide triton"
import xquant_fx
print(sorted(m for m in sys.modules if m.split(".")[0] in ("triton", "torchao")))
import torch._library.triton
torch._library.triton.get_inner_triton_kernels(lambda: None)  # the notice, once, before the filter
from xquant_fx import cli
cli.quiet_missing_triton()
import xquant_fx.ops
logging.getLogger("torch._library.triton").warning("kept")
"""
    done = python("-c", script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert done.stderr.count("Triton not available") == 1 and "kept" in done.stderr
