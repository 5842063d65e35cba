"""The `covidct` command: a thin click group. Each command group lives in its own module, and each command parses
its options and hands over to library functions; heavy imports live inside the commands so `--help` is instant."""

from __future__ import annotations

import os

import click

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before any command imports TensorFlow

from covidct.cli import artifacts, evaluation, jobs, training  # noqa: E402  pylint: disable=wrong-import-position
from covidct.cli.data import data  # noqa: E402  pylint: disable=wrong-import-position


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="covidct")
def main():
  """COVID-CT: build the dataset, train, evaluate, export, push and benchmark a COVID-19 CT classifier."""
  import signal  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel

  # A terminated run unwinds like an interrupted one, so no temporary folder is left behind.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


main.add_command(data)
for _module in (training, evaluation, artifacts, jobs):
  for _command in vars(_module).values():
    if isinstance(_command, click.Command):
      main.add_command(_command)
