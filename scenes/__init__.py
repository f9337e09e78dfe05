"""Whole scenes on disk: PNG/JPEG and (Geo)TIFF reading and writing, block-streamed super-resolution
of rasters too large for memory, and uncertainty maps. No models: the caller passes the network."""
