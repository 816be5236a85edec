"""Score networks, registered by name (``config.model.name``); see ``models.utils.get_model``."""
