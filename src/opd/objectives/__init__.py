"""One file per objective; each is a callable returning ``(loss, metrics)``."""
