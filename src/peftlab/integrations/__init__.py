"""Integrations with training frameworks (imported on demand: they import the framework)."""
