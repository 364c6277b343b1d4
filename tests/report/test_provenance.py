from effllm.bench.cpu import cpu_name, cpuinfo_fields, half_precision_flags
from effllm.report import provenance

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
processor\t: 1
model name\t: AMD EPYC
"""


def test_cpu_is_named_with_family_and_model():
    assert cpu_name(cpuinfo_fields(CPUINFO)) == "AMD EPYC (cpu family 25, model 17)"
    assert cpu_name(cpuinfo_fields("model name\t: Intel Xeon\n")) == "Intel Xeon"


def test_half_precision_flags_are_read_from_the_flags_line():
    flags = half_precision_flags(cpuinfo_fields("flags\t: fpu avx512f avx512_bf16 f16c\n"))
    assert flags["AVX-512 BF16 dot products"] and flags["F16C fp16<->fp32 conversion"]
    assert not flags["AVX-512 FP16 arithmetic"] and not flags["AMX BF16 tiles"]


def test_collect_names_the_hardware_and_versions():
    prov = provenance.collect()
    assert prov["hardware"]["logical_cores"] >= 1 and prov["hardware"]["cpu"]
    assert prov["packages"]["torch"] and prov["python"]
    groups = provenance.describe(prov)
    assert list(groups) == ["Hardware", "Software", "Model", "Data", "Run"]
    hardware = dict(groups["Hardware"])
    assert "logical cores" in hardware["CPU"] and hardware["GPU"]
    assert dict(groups["Software"])["torch"] == prov["packages"]["torch"]
    assert {name for name, _ in groups["Data"]} >= {"data/alpaca_subset.json", "data/alpaca_eval.json"}


def test_models_are_grouped_once_with_the_notebooks_that_used_them():
    meta = {
        stem: {"model": {"source": "m.gguf", "kind": "gguf", "path": "~/m.gguf", "sha256": {"m.gguf": "ab"}}}
        for stem in ("01_kv_cache", "02_lora")
    }
    model = provenance.describe({}, meta)["Model"]
    assert model == [("m.gguf (gguf)", "used by 01_kv_cache, 02_lora (~/m.gguf)"), ("sha256 of m.gguf", "ab")]
