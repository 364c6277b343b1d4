from effllm import provenance

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
processor\t: 1
model name\t: AMD EPYC
"""


def test_cpu_is_named_with_family_and_model():
    assert provenance._cpu_name(CPUINFO) == "AMD EPYC (cpu family 25, model 17)"
    assert provenance._cpu_name("model name\t: Intel Xeon\n") == "Intel Xeon"


def test_collect_names_the_hardware_and_versions():
    prov = provenance.collect()
    assert prov["hardware"]["logical_cores"] >= 1 and prov["hardware"]["cpu"]
    assert prov["packages"]["torch"] and prov["python"]
    rows = dict(provenance.describe(prov))
    assert "logical cores" in rows["CPU"] and rows["GPU"]
