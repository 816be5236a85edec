"""Score networks, registered by name (``config.model.name``); see ``scoresde.models.utils.get_model``."""
