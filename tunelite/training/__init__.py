"""Plain helpers the recipes call from their training loops: reporting, signals, the non-finite
check, validation, optimizers, schedules, loggers, the memory estimate. None reads the config."""
