"""lte-swarm's peer roles (trainer, coordinator, monitor), their data and models, and the CLI."""
