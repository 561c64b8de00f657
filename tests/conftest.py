"""Triton's interpreter runs the fused kernels on CPU tensors: it must be chosen before anything
imports Triton, so it is set here, before the test modules are collected."""
import os

os.environ.setdefault('TRITON_INTERPRET', '1')
