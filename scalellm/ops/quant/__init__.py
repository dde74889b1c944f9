"""Block-quantized weights (GGUF's Q8_0, Q4_0, Q4_1): the tensor that holds them as in the file,
the LLVM IR that decodes a block, the numba GEMM kernels over them, and the projections that use them.
"""
