"""Evaluation recipes (JSON), shipped as package data: `mc-retrofit eval --recipe NAME`."""
