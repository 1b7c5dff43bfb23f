"""Block-sparse flash attention: ``gpu.flash_attention`` (Pallas/Triton), ``tpu.flash_attention``
(Pallas Mosaic TPU) and ``mosaic_gpu.flash_attention`` (Hopper: Mosaic GPU forward + the Triton
backward), same signature; see ``pallas_kernels/common.py`` for the block plan and mask."""
