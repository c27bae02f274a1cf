"""Data: listing a data set (``listing``), checking image files (``images``), world-size-free
sampling (``samplers``), augmentation (``augment``), the loaders and RAM cache (``loaders``), the
GPU-resident cache and augmentation (``device_cache``), and the synthetic demo set (``demo``).
"""
