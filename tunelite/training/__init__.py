"""What every recipe shares: devices, seeding, model loading, schedules, logging."""
