"""CUDA: the launchers for cuda_kernels/*.cu (compiled by CuPy's NVRTC), the host build that runs
the same sources on the CPU for tests, and the step's host <-> device transfers.
"""
