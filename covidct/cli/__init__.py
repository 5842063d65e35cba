"""The `covidct` command: a thin click group. Each command group lives in its own module, and each command parses
its options and hands over to library functions; heavy imports live inside the commands so `--help` is instant."""

from __future__ import annotations

import os

import click

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before any command imports TensorFlow

from covidct.cli import artifacts, evaluation, jobs, serving, training  # noqa: E402  pylint: disable=wrong-import-position
from covidct.cli.data import data  # noqa: E402  pylint: disable=wrong-import-position


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="covidct")
@click.option("--verbose", is_flag=True, help="Show TensorFlow's own log lines and library warnings too.")
def main(verbose):
  """COVID-CT: build the dataset, train, evaluate, export, push and benchmark a COVID-19 CT classifier."""
  import signal  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel

  if not verbose:
    from covidct.cli.quiet import quiet_python  # pylint: disable=import-outside-toplevel

    quiet_python()

  # A terminated run unwinds like an interrupted one, so no temporary folder is left behind.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


main.add_command(data)
for _module in (training, evaluation, artifacts, jobs, serving):
  for _command in vars(_module).values():
    if isinstance(_command, click.Command):
      main.add_command(_command)


def entry():
  """The `covidct` console command: `main`, with TensorFlow's start-up lines filtered from the console unless
  --verbose (or COVIDCT_VERBOSE=1) is given."""
  import sys  # pylint: disable=import-outside-toplevel

  if "--verbose" not in sys.argv[1:2] and os.environ.get("COVIDCT_VERBOSE", "") in ("", "0"):
    from covidct.cli.quiet import install  # pylint: disable=import-outside-toplevel

    install()
  main()  # pylint: disable=no-value-for-parameter
