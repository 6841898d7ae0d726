"""The shipped YAML recipes, installed as package data of ``geoprn.configs``."""
