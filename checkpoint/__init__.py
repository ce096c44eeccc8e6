"""Checkpoints: committed by a manifest, sharded per rank, exported as HF directories."""
