"""TRL v0.11's PPOTrainer surface beyond ``generate``/``step`` (filled in by issue 14's work)."""


class TRLCompatMixin:
    """Attributes and methods TRL v0.11 scripts reach for on a ``PPOTrainer``."""
