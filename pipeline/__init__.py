"""The MovieLens recommender pipeline: one module per DVC stage (docs/pipeline.md).

Importing the package pins the CPU kernels first (pipeline/cpu.py), before any stage loads numpy
or torch, so that the same params and data give the same bytes on every x86-64 machine with AVX2.
"""
from pipeline.cpu import pin as _pin

_pin()
