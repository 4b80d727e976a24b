"""Triton kernels, one op per file, each beside its launcher. Imported only when the triton backend
is chosen, so that importing the library never imports triton."""


def triton_ops():
    from ..ops import Ops
    from .attention import attention
    from .geglu import geglu
    from .layer_norm import layer_norm
    from .pooling import pool
    from .rotary import rotary

    return Ops(name="triton", layer_norm=layer_norm, rotary=rotary, attention=attention, geglu=geglu, pool=pool)
