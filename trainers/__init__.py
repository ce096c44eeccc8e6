"""Trainers: PPOTrainer, CriticFreeTrainer and what they share."""
