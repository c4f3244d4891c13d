"""quintet: five transformer systems on one fast shared core."""

__version__ = "0.1.0"
