"""trb_exp: on-policy distillation with Trust-Region Behavior Blending."""

__version__ = "0.1.0"
