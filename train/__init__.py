"""Everything around the model: config, data, distributed setup, trainer, evaluation, CLI."""
