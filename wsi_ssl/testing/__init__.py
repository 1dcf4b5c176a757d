"""Helpers shared by the tests and benchmarks (as ``zarr.testing`` is for zarr's): not used by
the library itself.

* :mod:`wsi_ssl.testing.bags`: a slide store holding only a bag of embeddings (MIL tests).
* :mod:`wsi_ssl.testing.vectors`: clustered synthetic vectors (search tests and benchmarks).
* :mod:`wsi_ssl.testing.tile_stores`: a slide store written from tiles in memory (pretraining
  tests).
* :mod:`wsi_ssl.testing.tiles`: a grid's tiles read straight from a slide (tiling tests and
  benchmarks).
"""
