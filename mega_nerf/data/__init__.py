"""Dataset layout (Mega-NeRF's), images, and the shuffled ray chunks the trainer streams."""
