"""What a report says about the machine its times come from."""
from __future__ import annotations

from spiral_cli.machine import cpu_isa, describe, summary_line

# the flags lines of our three 2-core machine kinds, cut to the flags that matter and a few beside them
AMX_XEON = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
AVX512_EPYC = "model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
AVX2_EPYC = "model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n"


def test_cpu_isa_names_the_most_capable_matrix_instructions():
    assert cpu_isa(AMX_XEON) == "AMX-BF16"
    assert cpu_isa(AVX512_EPYC) == "AVX512-BF16"
    assert cpu_isa(AVX2_EPYC) == "AVX2"
    assert cpu_isa("flags\t: fpu sse2 avx512f\n") == "AVX512"
    # an ARM /proc/cpuinfo has "Features", not "flags"; no line at all: unknown, not a guess
    assert cpu_isa("processor\t: 0\nFeatures\t: fp asimd sve\n") == ""
    assert cpu_isa("") == ""
    # a flag's name inside another's does not count ("xavx2" is not avx2)
    assert cpu_isa("flags\t: fpu xavx2 amx_bf16x\n") == ""


def test_summary_line_names_the_instructions_and_reads_older_records():
    assert summary_line({"cpu": "Intel(R) Xeon(R) Processor", "isa": "AMX-BF16", "cores": 2, "gpus": []}) == \
        "2-core Intel(R) Xeon(R) Processor, AMX-BF16"
    # a machine log written before "isa" was recorded reads as it did then
    assert summary_line({"cpu": "AMD EPYC", "cores": 2, "gpus": []}) == "2-core AMD EPYC"
    assert summary_line({"cpu": "AMD EPYC", "isa": "AVX512", "cores": 16, "gpus": ["NVIDIA H200"]}) == \
        "1 x NVIDIA H200 (16-core AMD EPYC, AVX512)"


def test_describe_records_this_machines_instructions():
    machine = describe()
    assert machine["isa"] == cpu_isa()
    assert (", " + machine["isa"] in summary_line(machine)) == bool(machine["isa"])
