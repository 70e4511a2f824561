"""Quality evaluation: the offline reference harness (and, later, engine-mode evaluation)."""
