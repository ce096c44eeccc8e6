"""The job driver: prompt data, actor pools, Ray set-up, the loop and the ``rlfleet train`` command."""
