"""Where a run's data lives: locations (local folders, s3://, gs://), the preference store,
and the reward model's versioned weights."""
