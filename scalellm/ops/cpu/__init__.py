"""CPU kernels: numba twins of the CUDA kernels (norms, rotary, KV writes, decode attention, sampling,
token bitmasks, LoRA), the small-batch bfloat16 GEMM over panel-packed weights, the LLVM IR they call
for bfloat16 vector code, and the one OpenMP runtime they share with torch.
"""
