"""Locked teachers: their definitions (`definitions`), the resumable per-corpus feature cache (`cache`),
the keys their features reach the losses under (`keys`), and a run's set of teachers (`features`)."""
