"""The engine, in the order a plan lives: capture -> plan -> execute -> cost -> search -> compile (engine.py: the public face)."""
