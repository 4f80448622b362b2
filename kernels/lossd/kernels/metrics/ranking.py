"""(family module: functions register here)."""
