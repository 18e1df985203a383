"""Triton kernels of spo_fast, installed as ``spo_fast.kernels``.

The front end never imports these by name: ``spo_fast`` functions dispatch to them when CUDA and Triton are
present and fall back to the PyTorch references otherwise.
"""
