"""Fitting: the trainer and its phases, DDP, the linear probe, the backbone leaderboard and the fusion
head's training. Imports model, data and core."""
