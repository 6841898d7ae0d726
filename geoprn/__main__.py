"""``python -m geoprn`` is the ``geoprn`` command."""

from geoprn.cli.main import cli

cli(prog_name="geoprn")
