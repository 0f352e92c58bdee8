"""Compile: a program recorded into straight-line fx (recording, tape), CUDA graphs, and self-contained export."""
