"""Training: ``trainer.fit`` (the epoch loop), ``setup`` (the builders it and lr-find share),
``engine`` (one epoch of training or evaluation), the optimizer and its schedule (``optim``), EMA,
MixUp/CutMix, CUDA graphs, the run state a resume continues from, and the console report.
Only this package and ``tl_dist.distributed`` know that there may be more than one process.
"""
