"""Triton kernels of the quantized KV cache (DESIGN §2).

``append``: the decode-step write (:func:`xquant_fx.quant.append_token` in one launch).
``attend``: flash-decoding attention over the packed cache (:func:`xquant_fx.quant.attend` over
``read_keys`` / ``read_values``).

Importing this package imports ``triton``; ``xquant_fx`` itself never imports it. Kernels are
decorated at import time, so set ``TRITON_INTERPRET=1`` before importing these modules to run them
on CPU tensors.
"""
