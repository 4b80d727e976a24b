"""Triton kernels, one op per file, each beside its launcher. Imported only when the Triton backend
is chosen (`ops.triton_ops`), so that importing the library never imports triton."""
