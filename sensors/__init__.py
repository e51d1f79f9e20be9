"""Sensors and schedules that launch batches and report on their runs."""
