"""Text for tuning and evaluation: where documents come from, how they become token ids, and
the windows a model sees (one data path for ``finetune``, ``eval --data`` and ``calibrate``)."""
