"""Shared pieces of the layered-generation reproductions (LayerDecomp, LASAGNA, workflow
layers, LayerBind): ``metrics`` (background PSNR, alpha IoU, recomposition error, order
accuracy, region adherence, layer coherence) and ``plots`` (image grids of RGBA layers).
The data are :mod:`mechinterp.train.layered_scenes`."""
