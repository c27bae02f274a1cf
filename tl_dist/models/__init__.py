"""Models: building any torchvision classifier with a new head (``backbones``), the head rule and
freezing (``heads``), and pretrained or local weights (``pretrained``). No processes, no devices.
"""
