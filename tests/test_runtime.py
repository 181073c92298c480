import platform
from pathlib import Path

import pytest
import torch

from mri_vqvae import runtime
from mri_vqvae.errors import ConfigError
from mri_vqvae.model import VQVAE
from mri_vqvae.runtime import autocast, keep_freed_memory, resolve_precision
from mri_vqvae.train.vqvae import uses_channels_last
from tests.helpers import fit_vqvae, tiny_config, tiny_model_config

CPU = torch.device("cpu")


@pytest.mark.parametrize("has_amx, expected", [(True, "bfloat16"), (False, "float32")])
def test_auto_precision_is_bfloat16_only_on_cpus_with_matrix_units(monkeypatch, has_amx, expected):
    monkeypatch.setattr(runtime, "cpu_has_bfloat16_matrix_units", lambda: has_amx)
    assert resolve_precision("auto", CPU) == expected
    assert resolve_precision("float32", CPU) == "float32"
    assert resolve_precision("bfloat16", CPU) == "bfloat16"
    with pytest.raises(ValueError, match="float8"):
        resolve_precision("float8", CPU)


@pytest.mark.parametrize(
    "cap, amx_allowed",
    [
        (None, True),
        ("", True),
        ("ALL", True),
        ("DEFAULT", True),
        ("avx512_core_amx", True),
        ("AVX10_1_512_AMX_FP16", True),
        ("AVX2", False),
        ("avx512_core_bf16", False),
    ],
)
def test_a_onednn_cap_below_amx_makes_auto_float32_on_an_amx_cpu(monkeypatch, cap, amx_allowed):
    # On a CPU with AMX, oneDNN capped below it runs bfloat16 products emulated: auto must
    # not pick bfloat16 there.
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    assert runtime.onednn_may_use_amx() is amx_allowed
    assert resolve_precision("auto", CPU) == ("bfloat16" if amx_allowed else "float32")
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: frozenset({"avx2"}))
    assert resolve_precision("auto", CPU) == "float32"


@pytest.mark.parametrize(
    "flags, cap, expected, why",
    [
        # An AMD EPYC Zen 4: AVX-512 with its bfloat16 dot products, no AMX.
        ({"avx512f", "avx512_bf16"}, None, "bfloat16", "has AVX-512 BF16 instructions"),
        ({"avx512f", "avx512_bf16"}, "AVX512_CORE_BF16", "bfloat16", "has AVX-512 BF16"),
        ({"avx512f", "avx512_bf16"}, "AVX512_CORE_VNNI", "float32", "caps oneDNN below them"),
        ({"avx512f", "avx512_bf16"}, "AVX2", "float32", "ONEDNN_MAX_CPU_ISA=AVX2 caps"),
        # AVX-512 without bfloat16 (Skylake, Zen 3 has none at all), and AVX2 only.
        ({"avx512f", "avx2"}, None, "float32", "no bfloat16 matrix instructions"),
        ({"avx2", "fma"}, None, "float32", "no bfloat16 matrix instructions"),
        # AMX and AVX-512 BF16 both: capped below AMX, the AVX-512 units still serve.
        ({"amx_bf16", "avx512_bf16"}, "AVX512_CORE_BF16", "bfloat16", "has AVX-512 BF16"),
        ({"amx_bf16", "avx512_bf16"}, None, "bfloat16", "has AMX instructions"),
        (set(), None, "float32", "no bfloat16 matrix instructions"),
    ],
)
def test_auto_precision_follows_the_instructions_onednn_will_use(
    monkeypatch, flags, cap, expected, why
):
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: frozenset(flags))
    precision, reason = runtime.precision_choice("auto", CPU, "train.precision")
    assert precision == expected
    assert reason.startswith("auto: this CPU") and why in reason
    # A precision set by hand is kept, and says so.
    assert runtime.precision_choice("float32", CPU, "train.precision") == (
        "float32",
        "train.precision float32",
    )


def test_the_cpu_flags_are_read_from_proc_cpuinfo():
    flags = runtime._cpu_flags()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    first = next((line for line in lines if line.startswith("flags")), None)
    if first is None:  # not Linux, or a CPU that lists "Features"
        assert flags == frozenset()
    else:
        assert flags == frozenset(first.split(":", 1)[1].split()) and flags


def test_the_old_onednn_variable_name_caps_too_unless_the_new_one_is_set(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")
    assert not runtime.onednn_may_use_amx()
    # oneDNN reads ONEDNN_MAX_CPU_ISA first.
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "ALL")
    assert runtime.onednn_may_use_amx()
    # A name oneDNN does not know caps nothing.
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX9000")
    assert runtime.onednn_allows("AVX512_CORE_AMX")


def test_float16_is_refused_on_a_cpu_naming_the_setting(phantom_root, tmp_path):
    from tests.helpers import tiny_splits

    with pytest.raises(ConfigError, match=r"prior_train\.precision=float16 is for CUDA GPUs"):
        resolve_precision("float16", CPU, "prior_train.precision")
    # Checked before any work: a CPU run asking for it stops before its run folder is made.
    data = tiny_splits(phantom_root)
    model = VQVAE.from_config(tiny_model_config())
    config = tiny_config(precision="float16")
    with pytest.raises(ConfigError, match=r"train\.precision=float16"):
        fit_vqvae(model, data, config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_only_float16_gets_a_loss_scaler():
    assert runtime.gradient_scaler(CPU, "float32") is None
    assert runtime.gradient_scaler(CPU, "bfloat16") is None
    scaler = runtime.gradient_scaler(CPU, "float16")
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()


def test_auto_autocast_follows_the_resolved_precision(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_bfloat16_matrix_units", lambda: True)
    layer = torch.nn.Linear(4, 4)
    with autocast(CPU, "auto"):
        assert layer(torch.ones(2, 4)).dtype == torch.bfloat16
    monkeypatch.setattr(runtime, "cpu_has_bfloat16_matrix_units", lambda: False)
    with autocast(CPU, "auto"):
        assert layer(torch.ones(2, 4)).dtype == torch.float32


def test_the_run_records_the_precision_auto_resolved_to(phantom_root, tmp_path, monkeypatch):
    from mri_vqvae.checkpoint import load_checkpoint
    from mri_vqvae.config import DataConfig, load_config
    from mri_vqvae.data.dataset import load_splits, resolve_split_files
    from tests.helpers import TINY_SIZE

    monkeypatch.setattr(runtime, "cpu_has_bfloat16_matrix_units", lambda: False)
    config = tiny_config(epochs=1)
    assert config.train.precision == "auto"
    data = load_splits(resolve_split_files(phantom_root), DataConfig(image_size=TINY_SIZE))
    torch.manual_seed(0)
    fit_vqvae(VQVAE.from_config(config.model), data, config, tmp_path)
    assert load_config(tmp_path / "config.yaml").train.precision == "float32"
    assert load_checkpoint(tmp_path / "last.pt").config.train.precision == "float32"


def test_memory_format_choice():
    seed = VQVAE.from_config(tiny_model_config(architecture="seed"))
    resnet = VQVAE.from_config(tiny_model_config())
    assert uses_channels_last("auto", seed, CPU)
    assert not uses_channels_last("auto", resnet, CPU)
    assert uses_channels_last("auto", resnet, torch.device("cuda"))
    assert uses_channels_last("channels_last", resnet, CPU)
    assert not uses_channels_last("contiguous", seed, torch.device("cuda"))


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_the_allocator_setting_takes_on_glibc():
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # a second call is harmless
