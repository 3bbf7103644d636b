"""Families whose models are transformers classes: Mamba, Mamba2, RWKV-4, and the Gated
DeltaNet layers of the Qwen3-Next hybrid. One file per family declares everything the rest
of mc-retrofit asks about it."""
