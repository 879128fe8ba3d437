"""The profiler's kernel families (omniedge.bench.kernels): which op a kernel name belongs to."""

from __future__ import annotations


def test_moe_kernels_of_qmoe_and_moeint4_share_one_family() -> None:
    from omniedge.bench.kernels import MOE_FAMILY, family

    for name in (
        "void onnxruntime::contrib::cuda::moe_gemv_kernel<__half>(...)",
        "void (anonymous namespace)::gate_up_swiglu<2, 2>(__half const*, ...)",
        "void (anonymous namespace)::down_weighted_sum<2>(__half const*, ...)",
        "(anonymous namespace)::scatter(Plan, int)",
        "void (anonymous namespace)::gate_up_gemm(__half const*, ...)",
    ):
        assert family(name) == MOE_FAMILY, name
    assert (
        family("void onnxruntime::contrib::cuda::MatMulFloat4BitsKernelM1<__half, 128, false>")
        == "MatMulNBits"
    )
    assert family("void onnxruntime::cuda::_ScatterND<float>") == "other"
