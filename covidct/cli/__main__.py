"""`python -m covidct.cli ...`: the covidct command, for a fresh process of the same interpreter."""

from covidct.cli import entry

entry()
