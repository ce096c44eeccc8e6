"""Helpers the tests share: S3 and Prometheus servers, job configs, rollout and trainer-step
batches, probes, spawned ranks, tracker files."""
