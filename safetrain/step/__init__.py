"""The compiled guarded loop and its pieces: the input check, per-example
drops, the loss watch, clipping, the loss scale, the drill, the loop state."""
