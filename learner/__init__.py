"""The learner's Ray role: its rank actors (actor.py) and their group (rank_group.py), the trainer
each algorithm runs with (registry.py), scored batches to trainer inputs (batches.py), metrics."""
