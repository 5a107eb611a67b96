"""The trainer: one recipe (setup, train, save_checkpoint, cleanup) plus small helpers. Imports torch."""
