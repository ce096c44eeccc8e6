"""The learner: value-head model, algorithms, trainer, learner actor and the job driver."""
