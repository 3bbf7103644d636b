"""Families whose models are transformers classes: Mamba, Mamba2, RWKV-4, the Gated
DeltaNet layers of the Qwen3-Next hybrid, and the Mamba layers of the hybrids that keep their
own copy of the Mamba2/Mamba scans (Bamba, Falcon-H1, Nemotron-H, Granite 4, Zamba2, Jamba;
and Falcon-Mamba; ``modeling.py`` holds what they share). One file per family declares
everything the rest of mc-retrofit asks about it."""
