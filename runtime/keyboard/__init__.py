"""The keyboard and personalization layer over the runtime engine: the user's text and adapter
stores, their word counts, and the gated :class:`~.personalizer.Personalizer`."""
