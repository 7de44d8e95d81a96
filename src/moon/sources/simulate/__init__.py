"""The simulated e-commerce world: catalogue, drawn images, user photos, users and search sessions."""
