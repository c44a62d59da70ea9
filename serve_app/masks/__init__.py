"""Masks in the forms Label Studio stores: brush RLE and polygons. Pure numpy / OpenCV, no Ray, no torch, so
the segmenter replicas (where the masks are) and the ingress (for in-process callers) share one encoder."""
