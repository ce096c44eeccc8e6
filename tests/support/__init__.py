"""Helpers the tests share: S3 and Prometheus servers, job configs, probes, spawned ranks,
tracker files."""
