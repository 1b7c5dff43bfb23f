"""Block-sparse flash attention: ``gpu.flash_attention`` (Pallas/Triton) and ``tpu.flash_attention``
(Pallas Mosaic TPU), same signature; see ``pallas_kernels/common.py`` for the block plan and mask."""
