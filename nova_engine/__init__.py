"""Nova Engine: the post-training engine (SFT → DPO → reward model → RLVR) on megatron-core."""

__version__ = "0.1.0"
