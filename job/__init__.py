"""The job driver, one concern per module.

``data`` (prompt rows, cursor, prompt batches with rollout ids), ``checks`` (config checks
before anything starts), ``pool`` (restartable actor pools), ``roles`` (starting the actors),
``sync`` (weight sync from the driver's side), ``loop`` (the iterations), ``metrics`` (the
driver's Prometheus metrics), ``cluster`` (Ray set-up) and ``train`` (the ``rlfleet train``
command).
"""
