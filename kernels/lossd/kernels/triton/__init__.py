"""Triton kernels for CUDA, each beside its torch reference.

Every module here imports triton at the top: import one only where triton is
installed (lossd.kernels.row_stats does so lazily, and uses torch when triton is
missing).  Under ``TRITON_INTERPRET=1``, set before the import, the kernels
run on CPU tensors; that is how the unit tests check them.
"""
