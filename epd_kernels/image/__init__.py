"""Image preprocessing ops: PIL's resize on uint8 RGB, bit for bit, and CLIP's crop + rescale +
normalize. `epd_kernels.image.reference` is the numpy oracle (runs anywhere); `epd_kernels.image.cuda`
holds the CUDA wrappers (needs epd_kernels._epd_C). This package imports neither, so that the
reference works on a machine without the extension."""
